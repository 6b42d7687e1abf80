"""Request bodies. Static bounds live on the fields; bounds that come from settings are checked in
`to_spec`, which turns a request into the route-independent GenerationSpec.

Validation is strict, as OpenAI's is: `"max_tokens": "10"` or `"stream": "yes"` are 422, not coerced (an integer
is still a valid float), and NaN or infinite numbers are refused as not finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pocketgpt.app.engine.grammar import ANY_OBJECT, GrammarKind, GrammarSpec
from pocketgpt.app.engine.logprobs import MAX_TOP_LOGPROBS
from pocketgpt.app.errors import APIError
from pocketgpt.app.generation import GenerationSpec, PromptRenderer, random_seed
from pocketgpt.app.settings import Settings
from pocketgpt.model.chat import ROLES as CHAT_ROLES
from pocketgpt.model.sampling import MIN_REPETITION_PENALTY, SamplingParams

MAX_SEED = 2**63 - 1
# A k beyond the vocabulary keeps every token; the bound only refuses numbers the sampler cannot hold (an
# unbounded int overflowed torch's int64 and failed the whole decode batch with a 500).
MAX_TOP_K = 1_000_000
StopString = Annotated[str, Field(min_length=1, max_length=256)]
StopList = Annotated[list[StopString], Field(max_length=4)]
# The schema's own cap on `messages`, so validation stays cheap whatever the body holds (25,000 messages took
# 0.6 s of event-loop time to validate); the server's bound, POCKETGPT_MAX_MESSAGES, is at most this.
MAX_MESSAGES_CAP = 2048
MAX_CONTENT_PARTS = 256
MAX_USER_CHARS = 256  # OpenAI's `user`: an end-user id, written to the access log
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
# The schema's own cap on `n` (choices per request); the server's bound, POCKETGPT_MAX_N, is at most this.
MAX_N_CAP = 128
# Strict types (no "10" -> 10, no "yes" -> True) and finite numbers only.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _check_prompt(prompt: str, settings: Settings) -> None:
    if len(prompt) > settings.max_prompt_chars:
        raise APIError(422, f"prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars}",
                       param="prompt", code="prompt_too_long")


def _check_n(n: int, settings: Settings) -> None:
    if n > settings.n_limit:  # POCKETGPT_MAX_N, and no more than the slots: the choices decode together
        raise APIError(422, f"n is {n}; the server allows at most {settings.n_limit} choices per request",
                       param="n", code="n_too_large")


def _check_max_tokens(value: int, settings: Settings, param: str) -> None:
    if value > settings.max_new_tokens:
        raise APIError(422, f"{param} is {value}; the server allows at most {settings.max_new_tokens}",
                       param=param, code="max_tokens_too_large")


def _grammar(kind: GrammarKind, value: str | dict[str, Any], settings: Settings, param: str) -> GrammarSpec:
    """The constraint, refused with 422 when larger than the server allows (its compile cost grows with it)."""
    spec = GrammarSpec.json_schema(value) if isinstance(value, dict) else GrammarSpec(kind, value)
    size = len(spec.source.encode())
    if size > settings.max_schema_bytes:
        raise APIError(422, f"{param} is {size} bytes; the limit is {settings.max_schema_bytes}", param=param,
                       code="schema_too_large")
    return spec


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`, as OpenAI's structured outputs take it."""

    model_config = ConfigDict(STRICT, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="the schema's name")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema the output must "
                                           "validate against; absent: any JSON object")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def grammar(self, settings: Settings) -> GrammarSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return GrammarSpec("json_schema", ANY_OBJECT)
        if self.json_schema is None:
            raise APIError(422, "response_format.json_schema is required when type is json_schema",
                           param="response_format.json_schema", code="invalid_value")
        schema = self.json_schema.schema_
        if schema is None:
            return GrammarSpec("json_schema", ANY_OBJECT)
        return _grammar("json_schema", schema, settings, "response_format.json_schema")


class GenerateRequest(BaseModel):
    """POST /v1/generate."""

    model_config = ConfigDict(STRICT, extra="forbid")

    prompt: str = Field(min_length=1, description="text to continue")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate at most (server bound applies)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (or below 1e-5) means greedy")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="keep the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0, description=">1 discourages seen tokens")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: StopString | StopList | None = Field(None, description="up to 4 strings that end the output")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="echoed back; random when absent")
    stream: bool = Field(False, description="server-sent events instead of one JSON body")
    logprobs: TopLogprobs | None = Field(None, description="each token's log-probability (raw model distribution) "
                                         "and this many most likely alternatives (0-20); absent: none")
    regex: str | None = Field(None, min_length=1, description="structured output: the output matches this regex "
                              "(Rust regex syntax, anchored at both ends)")
    json_schema: dict[str, Any] | None = Field(None, description="structured output: the output is JSON that "
                                               "validates against this schema")
    grammar: str | None = Field(None, min_length=1, description="structured output: the output matches this Lark "
                                "grammar (llguidance's dialect)")
    n: int = Field(1, ge=1, le=MAX_N_CAP, description="choices sampled from one prefill of the prompt (choice i "
                   "with seed + i); at most the server's max_n")

    def _grammar(self, settings: Settings) -> GrammarSpec | None:
        given = [name for name in ("regex", "json_schema", "grammar") if getattr(self, name) is not None]
        if len(given) > 1:
            raise APIError(422, f"give at most one of regex, json_schema and grammar, not {' and '.join(given)}",
                           param=given[1], code="invalid_value")
        return _grammar(given[0], getattr(self, given[0]), settings, given[0]) if given else None

    def to_spec(self, settings: Settings) -> GenerationSpec:
        _check_prompt(self.prompt, settings)
        grammar = self._grammar(settings)
        # The default (64) never exceeds the server's bound: only a value the client sent is refused.
        max_new = self.max_new_tokens if "max_new_tokens" in self.model_fields_set else \
            min(self.max_new_tokens, settings.max_new_tokens)
        _check_max_tokens(max_new, settings, "max_new_tokens")
        _check_n(self.n, settings)
        params = SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )
        seed = random_seed() if self.seed is None else self.seed
        return GenerationSpec(self.prompt, max_new, params, seed, _stops(self.stop), grammar=grammar,
                              grammar_param="regex" if grammar is None else grammar.kind, n=self.n,
                              logprobs=self.logprobs)


def _openai_sampling(body: OpenAISamplingFields) -> SamplingParams:
    """Sampling parameters of an OpenAI-shaped request (a null field means its default)."""
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool | None = False


class OpenAISamplingFields(BaseModel):
    """Fields shared by the OpenAI completions and chat shapes. Unknown fields are accepted and ignored; fields
    that would change the answer's shape and are not supported (tools, functions) are refused. `response_format`
    (json_object, json_schema) constrains the output through `app.engine.grammar`."""

    model_config = ConfigDict(STRICT, extra="allow")

    model: str | None = Field(None, description="the served model's id (GET /v1/models); optional here, since the "
                              "server serves one model; another name is 404 model_not_found")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(0, ge=0, le=MAX_TOP_K)
    repetition_penalty: float | None = Field(1.0, ge=MIN_REPETITION_PENALTY, le=10.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    stop: StopString | StopList | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_N_CAP, description="choices sampled from one prefill of the prompt "
                          "(choice i with seed + i); at most the server's max_n")
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = Field(None, description="structured output: json_object (any JSON "
                                                   "object) or json_schema (JSON matching a schema)")

    def _grammar(self, settings: Settings) -> GrammarSpec | None:
        return None if self.response_format is None else self.response_format.grammar(settings)

    def _refuse_common(self) -> None:
        """400 for what this server cannot honour on either route (raised before anything is admitted)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                           code="invalid_value")
        unsupported = {
            "tools": bool(self.tools), "functions": bool(self.functions),
            "tool_choice": self.tool_choice not in (None, "none"),
            "function_call": self.function_call not in (None, "none"),
        }
        for name, bad in unsupported.items():
            if bad:
                raise APIError(400, f"{name}={getattr(self, name)!r:.200} is not supported by this server",
                               param=name, code="unsupported_parameter")

    @property
    def choices(self) -> int:
        return self.n or 1


class CompletionRequest(OpenAISamplingFields):
    """POST /v1/completions, the OpenAI legacy completions shape.

    Unknown fields are accepted and ignored (clients send many); fields we cannot honour (best_of other than n,
    suffix, logit_bias) are refused with 400 by `to_spec`. `top_k` and `repetition_penalty` are accepted as
    extensions, as other OpenAI-compatible servers do. `echo` with `logprobs` scores the prompt, and with
    `max_tokens: 0` only the prompt (how evaluation harnesses score a text); with n > 1 every choice carries
    the echoed prompt (computed once).
    """

    prompt: str | list[Any]
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    echo: bool | None = Field(False, description="prepend the prompt to the text (and, with logprobs, its tokens)")
    logprobs: TopLogprobs | None = Field(None, description="each token's log-probability (raw model distribution) "
                                         "and this many most likely alternatives (0-20)")
    best_of: int | None = Field(None, ge=1, le=MAX_N_CAP, description="only best_of = n (or absent): every "
                                "sampled choice is returned, none is ranked away")
    suffix: str | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS, description="an end-user id, written to the access log")

    def _refuse_unsupported(self) -> None:
        self._refuse_common()
        if self.best_of not in (None, self.choices):
            # Ranking candidates needs their log-probabilities; sampling best_of and returning n of them unranked
            # would silently be n samples. best_of = n is exactly n samples, so it is accepted.
            raise APIError(400, f"best_of={self.best_of!r} is not supported by this server: it returns every "
                           f"choice it samples, so best_of must equal n ({self.choices}) or be left out",
                           param="best_of", code="unsupported_parameter")
        unsupported = {
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
        max_tokens = min(16, settings.max_new_tokens) if self.max_tokens is None else self.max_tokens
        _check_max_tokens(max_tokens, settings, "max_tokens")
        if max_tokens == 0 and not self.echo:
            raise APIError(422, "max_tokens 0 generates nothing: it is only allowed with echo (to score the prompt)",
                           param="max_tokens", code="invalid_value")
        _check_n(self.choices, settings)
        params = _openai_sampling(self)
        seed = random_seed() if self.seed is None else self.seed
        # The prompt's logprobs when they are shown (echo + logprobs), or are the whole answer (max_tokens 0).
        prompt_logprobs = None
        if self.echo and (self.logprobs is not None or max_tokens == 0):
            prompt_logprobs = self.logprobs or 0
        return GenerationSpec(prompt, max_tokens, params, seed, _stops(self.stop), max_tokens_param="max_tokens",
                              model=self.model, grammar=self._grammar(settings),
                              grammar_param="response_format.json_schema", n=self.choices,
                              logprobs=self.logprobs, prompt_logprobs=prompt_logprobs)


class ChatContentPart(BaseModel):
    model_config = ConfigDict(STRICT, extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; `developer` is OpenAI's newer name for `system`. Content may be text parts."""

    model_config = ConfigDict(STRICT, extra="allow")  # e.g. `name`, accepted and ignored

    role: str
    content: str | Annotated[list[ChatContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None

    def as_dict(self, index: int) -> dict[str, str]:
        """{"role", "content"} for the chat template; raises 400 for what a text-only model cannot take."""
        role = "system" if self.role == "developer" else self.role
        if role not in CHAT_ROLES:
            raise APIError(400, f"messages.{index}.role {self.role!r} is not supported; use one of "
                           f"{[*CHAT_ROLES, 'developer']}", param=f"messages.{index}.role", code="unsupported_role")
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages.{index}.content: only text parts are supported",
                               param=f"messages.{index}.content", code="unsupported_content")
            content = "".join(part.text or "" for part in content)
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(OpenAISamplingFields):
    """POST /v1/chat/completions, the OpenAI chat shape (text only).

    As with CompletionRequest, unknown fields are ignored and ones we cannot honour (tools,
    logit_bias) are refused with 400. Without max_tokens / max_completion_tokens
    the answer may use whatever room the context leaves, up to the server's bound.
    """

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES_CAP)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(False, description="each output token's log-probability (raw model distribution)")
    top_logprobs: TopLogprobs | None = Field(None, description="with logprobs: this many most likely alternatives")
    logit_bias: dict[str, Any] | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS, description="an end-user id, written to the access log")

    def _refuse_unsupported(self) -> None:
        self._refuse_common()
        if self.top_logprobs and not self.logprobs:
            raise APIError(422, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        unsupported = {"logit_bias": bool(self.logit_bias)}
        for name, bad in unsupported.items():
            if bad:
                raise APIError(400, f"{name}={getattr(self, name)!r} is not supported by this server",
                               param=name, code="unsupported_parameter")

    def message_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict(i) for i, m in enumerate(self.messages)]

    def to_spec(self, settings: Settings,
                renderer: Callable[[list[dict[str, str]]], PromptRenderer]) -> GenerationSpec:
        """The spec; `renderer(messages)` turns the messages into prompt ids with the serving model's chat
        template (called once, with the messages converted once)."""
        self._refuse_unsupported()
        if len(self.messages) > settings.max_messages:
            raise APIError(422, f"messages holds {len(self.messages)} messages; the limit is {settings.max_messages}",
                           param="messages", code="too_many_messages")
        messages = self.message_dicts()
        chars = sum(len(m["content"]) for m in messages)
        if chars > settings.max_prompt_chars:
            raise APIError(422, f"messages hold {chars} characters; the limit is {settings.max_prompt_chars}",
                           param="messages", code="prompt_too_long")
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if given is not None:
            _check_max_tokens(given, settings, param)
        _check_n(self.choices, settings)
        params = _openai_sampling(self)
        seed = random_seed() if self.seed is None else self.seed
        return GenerationSpec("", given or settings.max_new_tokens, params, seed, _stops(self.stop),
                              max_tokens_param=param, render=renderer(messages), clip_to_context=given is None,
                              model=self.model, grammar=self._grammar(settings),
                              grammar_param="response_format.json_schema", n=self.choices,
                              logprobs=(self.top_logprobs or 0) if self.logprobs else None)


def openai_finish_reason(reason: str) -> str:
    """OpenAI knows only "stop" (end of text or a stop string) and "length"."""
    return "length" if reason == "length" else "stop"
