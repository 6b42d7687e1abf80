"""A model's own Jinja chat template (`chat_template` of a Hugging Face tokenizer_config.json), rendered safely.

Imported models keep the template they were trained with; meta.json stores it as

    {"format": "jinja", "template": "{% for message in messages %}..."}

It renders in jinja2's ImmutableSandboxedEnvironment (no attribute access to Python internals, no mutation of
the messages), with the variables Hugging Face templates expect (messages, add_generation_prompt, bos_token,
eos_token, raise_exception, strftime_now). The rendered text is encoded in one piece, as transformers'
apply_chat_template does, so the ids are the ones the model was trained on; a message whose content holds a
special-token string ("<|im_start|>") is refused, so no user can forge a turn. Each content is rendered as a
placeholder first to learn where it sits (so a template that edits content, say with `| trim`, gets it as
written). Generation ends at any of the tokenizer's end ids (eos and generation_config.json's list).

For fine-tuning, the tokens trained are each assistant message's content and the template text after it up to
and including the first end token (e.g. "<|im_end|>", "</s>").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from pocketgpt.model.chat import Message, RenderedChat
from pocketgpt.model.tokenizer import Tokenizer

FORMAT = "jinja"
MAX_TEMPLATE_CHARS = 100_000
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never in real text
_SPLIT = re.compile("\ue000(\\d+)\ue001")


def _raise(message: str) -> None:
    raise ValueError(f"the chat template refused the messages: {message}")


@dataclass(frozen=True)
class JinjaChatTemplate:
    """A Jinja chat template and how it turns messages into ids."""

    template: str

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template or len(self.template) > MAX_TEMPLATE_CHARS:
            raise ValueError(f"a Jinja chat template must be a non-empty string of at most {MAX_TEMPLATE_CHARS} "
                             "characters")
        _ = self._compiled  # a syntax error is an error now, not at the first request

    @cached_property
    def _compiled(self):
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.template)
        except TemplateSyntaxError as e:
            raise ValueError(f"the Jinja chat template does not parse: {e}") from None

    # -- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "template": self.template}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JinjaChatTemplate:
        unknown = sorted(set(data) - {"format", "template"})
        if unknown:
            raise ValueError(f"chat template has unknown field(s) {unknown}")
        return cls(data.get("template"))

    def to_jinja(self) -> str:
        return self.template

    @property
    def special_tokens(self) -> list[str]:
        """Tokens to add to the tokenizer: none, the template uses the model's own."""
        return []

    # -- tokens --------------------------------------------------------------------------------------
    def check(self, tokenizer: Tokenizer) -> None:
        """Raise ValueError unless a small conversation renders with this tokenizer."""
        self.render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        return tokenizer.stop_ids

    # -- rendering -----------------------------------------------------------------------------------
    def render(self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
               ) -> RenderedChat:
        """Render `messages`; ValueError names a bad message or what the template refused."""
        from jinja2 import TemplateError

        specials = tokenizer.special_tokens
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(f"message {i}: role and content must be strings")
            forged = next((t for t in specials if t in content), None)
            if forged is not None:
                raise ValueError(f"message {i}: content contains the special token {forged!r}")
        placeheld = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        settings = tokenizer.settings
        try:
            text = self._compiled.render(messages=placeheld, add_generation_prompt=add_generation_prompt,
                                         bos_token=settings.bos_token or "", eos_token=settings.eos_token)
        except TemplateError as e:
            raise ValueError(f"the chat template failed to render: {e}") from None
        # Put the contents in as written, remembering where each sits: (start, end, is an assistant message).
        parts = _SPLIT.split(text)  # template text, message index, template text, ...
        pieces, spans, at = [], [], 0
        for k, part in enumerate(parts):
            if k % 2:
                message = messages[int(part)]
                part = message["content"]
                spans.append((at, at + len(part), message["role"] == "assistant"))
            pieces.append(part)
            at += len(part)
        ids, offsets = tokenizer.encode_with_offsets("".join(pieces))
        return RenderedChat(ids, self._mask(ids, offsets, spans, set(tokenizer.stop_ids)))

    @staticmethod
    def _mask(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int, bool]], ends: set[int]
              ) -> list[bool]:
        """Trained tokens: those starting inside an assistant content, then template text up to an end token."""
        mask, trailing, span = [], False, 0
        for token, (start, _) in zip(ids, offsets, strict=True):
            while span < len(spans) and start >= spans[span][1]:
                trailing = spans[span][2]  # just left an assistant content: its end marker follows
                span += 1
            inside = span < len(spans) and spans[span][0] <= start < spans[span][1]
            if inside:
                mask.append(spans[span][2])
                continue
            mask.append(trailing)
            if token in ends:
                trailing = False
        return mask
