"""Request bodies. Static bounds live on the fields; bounds that come from settings are checked in
`to_spec`, which turns a request into the route-independent GenerationSpec."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.errors import APIError
from app.generation import GenerationSpec, random_seed
from app.settings import Settings
from model.sampling import SamplingParams

MAX_SEED = 2**63 - 1
StopString = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[list[StopString], Field(max_length=4)]


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _check_prompt(prompt: str, settings: Settings) -> None:
    if len(prompt) > settings.max_prompt_chars:
        raise APIError(422, f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars}",
                       param="prompt", code="prompt_too_long")


def _check_max_tokens(value: int, settings: Settings, param: str) -> None:
    if value > settings.max_new_tokens:
        raise APIError(422, f"{param} is {value}; the server allows at most {settings.max_new_tokens}",
                       param=param, code="max_tokens_too_large")


class GenerateRequest(BaseModel):
    """POST /v1/generate."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="text to continue")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate at most (server bound applies)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description=">1 discourages seen tokens")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: StopString | StopList | None = Field(None, description="up to 4 strings that end the output")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="echoed back; random when absent")
    stream: bool = Field(False, description="server-sent events instead of one JSON body")

    def to_spec(self, settings: Settings) -> GenerationSpec:
        _check_prompt(self.prompt, settings)
        _check_max_tokens(self.max_new_tokens, settings, "max_new_tokens")
        params = SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
        seed = random_seed() if self.seed is None else self.seed
        return GenerationSpec(self.prompt, self.max_new_tokens, params, seed, _stops(self.stop))


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    """POST /v1/completions, the OpenAI legacy completions shape.

    Unknown fields are accepted and ignored (clients send many); fields we cannot honour (n > 1, echo,
    logprobs, best_of, suffix, logit_bias) are refused with 400 by `to_spec`. `top_k` and
    `repetition_penalty` are accepted as extensions, as other OpenAI-compatible servers do.
    """

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[Any]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(0, ge=0)
    repetition_penalty: float | None = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    stop: StopString | StopList | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None

    def _refuse_unsupported(self) -> None:
        unsupported = {
            "n": self.n not in (None, 1),
            "best_of": self.best_of not in (None, 1),
            "echo": bool(self.echo),
            "logprobs": self.logprobs is not None,
            "suffix": bool(self.suffix),
            "logit_bias": bool(self.logit_bias),
        }
        for name, bad in unsupported.items():
            if bad:
                raise APIError(400, f"{name}={getattr(self, name)!r} is not supported by this server",
                               param=name, code="unsupported_parameter")

    def prompt_text(self) -> str:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise APIError(400, "prompt must be a string or a list of exactly one string", param="prompt",
                               code="unsupported_parameter")
            prompt = prompt[0]
        if not prompt:
            raise APIError(422, "prompt must not be empty", param="prompt", code="invalid_value")
        return prompt

    def to_spec(self, settings: Settings) -> GenerationSpec:
        self._refuse_unsupported()
        prompt = self.prompt_text()
        _check_prompt(prompt, settings)
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        _check_max_tokens(max_tokens, settings, "max_tokens")
        params = SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )
        seed = random_seed() if self.seed is None else self.seed
        return GenerationSpec(prompt, max_tokens, params, seed, _stops(self.stop), max_tokens_param="max_tokens")


def openai_finish_reason(reason: str) -> str:
    """OpenAI knows only "stop" (end of text or a stop string) and "length"."""
    return "length" if reason == "length" else "stop"
