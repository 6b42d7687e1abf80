"""Chat templates: how a list of messages becomes token ids, shared by the fine-tuning trainer and the server.

A checkpoint fine-tuned on conversations stores its template in meta.json under "chat_template":

    {"format": "pocketgpt-chat/1",
     "roles": {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"},
     "end": "<|end|>"}

Every role marker and the end marker is a special token of the checkpoint's tokenizer. A conversation renders as

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

and a prompt for a new answer ends with the assistant marker, so the model writes the answer and then `end`,
where generation stops. Markers are inserted as ids and message content is encoded with special-token strings
read as plain text, so a user who types "<|assistant|>" cannot forge a turn. Training puts the loss on the
tokens the model must produce: each assistant message's content and its end marker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pocketgpt.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pocketgpt.model.chat_jinja import JinjaChatTemplate

FORMAT = "pocketgpt-chat/1"
META_KEY = "chat_template"  # the key of meta.json that holds the template
ROLES = ("system", "user", "assistant")
DEFAULT_ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
DEFAULT_END = "<|end|>"

Message = Mapping[str, Any]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class RenderedChat:
    """Token ids of a rendered conversation; `mask[i]` is True where ids[i] is a token the model is trained to
    produce (assistant content and its end marker)."""

    ids: list[int]
    mask: list[bool]


@dataclass(frozen=True)
class ChatTemplate:
    """Role markers and the end-of-message marker (all special tokens)."""

    roles: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    end: str = DEFAULT_END

    def __post_init__(self) -> None:
        if set(self.roles) != set(ROLES):
            raise ValueError(f"chat template roles must be exactly {list(ROLES)}, got {sorted(self.roles)}")
        markers = [*self.roles.values(), self.end]
        if not all(isinstance(m, str) and m for m in markers) or len(set(markers)) != len(markers):
            raise ValueError(f"chat template markers must be distinct non-empty strings, got {markers}")

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "roles": dict(self.roles), "end": self.end}

    @classmethod
    def from_dict(cls, data: Any) -> ChatTemplate:
        """Parse the stored form; ValueError says what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"chat template must be an object with format {FORMAT!r}, got {data!r:.200}")
        unknown = sorted(set(data) - {"format", "roles", "end"})
        if unknown:
            raise ValueError(f"chat template has unknown field(s) {unknown}")
        roles = data.get("roles")
        if not isinstance(roles, dict):
            raise ValueError("chat template 'roles' must be an object of role -> marker")
        return cls(roles=dict(roles), end=data.get("end"))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ChatTemplate | JinjaChatTemplate | None:
        """The template a checkpoint's meta.json carries (ours, or a model's own Jinja one), or None."""
        data = meta.get(META_KEY)
        if isinstance(data, dict) and data.get("format") == "jinja":
            from pocketgpt.model.chat_jinja import JinjaChatTemplate

            return JinjaChatTemplate.from_dict(data)
        return None if data is None else cls.from_dict(data)

    def to_jinja(self) -> str:
        """The same rendering as a Jinja chat template, for exported models (tokenizer_config.json)."""
        roles = "".join(f"{{% {'if' if i == 0 else 'elif'} m['role'] == '{r}' %}}{{{{ '{self.roles[r]}' }}}}"
                        for i, r in enumerate(ROLES))
        return (f"{{% for m in messages %}}{roles}{{% endif %}}{{{{ m['content'] + '{self.end}' }}}}{{% endfor %}}"
                f"{{% if add_generation_prompt %}}{{{{ '{self.roles['assistant']}' }}}}{{% endif %}}")

    # -- tokens ------------------------------------------------------------------------------------
    @property
    def special_tokens(self) -> list[str]:
        """The markers, in a fixed order (the order they are added to a tokenizer that lacks them)."""
        return [self.roles[r] for r in ROLES] + [self.end]

    def _id(self, tokenizer: Tokenizer, token: str) -> int:
        i = tokenizer.token_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {token!r} token required by the chat template")
        return i

    def check(self, tokenizer: Tokenizer) -> None:
        """Raise ValueError unless every marker is a token of `tokenizer`."""
        for token in self.special_tokens:
            self._id(tokenizer, token)

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """Ids that end an answer: the end marker, and any role marker (a new turn means the answer is over)."""
        return tuple(self._id(tokenizer, t) for t in [self.end, *(self.roles[r] for r in ROLES)])

    # -- rendering ---------------------------------------------------------------------------------
    def render(self, tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
               ) -> RenderedChat:
        """Render `messages`; with `add_generation_prompt`, end with the assistant marker (a prompt to answer).

        Raises ValueError for an unknown role or non-string content, naming the message.
        """
        ids: list[int] = []
        mask: list[bool] = []
        end = self._id(tokenizer, self.end)
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i}: role must be one of {list(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string")
        # One batch call for every message: it does not hold the GIL, so a server rendering a long conversation
        # in a worker thread leaves its event loop free.
        contents = tokenizer.encode_batch([m["content"] for m in messages], allow_special=False)
        for message, content_ids in zip(messages, contents, strict=True):
            role = message["role"]
            trained = role == "assistant"
            body = [*content_ids, end]
            ids += [self._id(tokenizer, self.roles[role]), *body]
            mask += [False] + [trained] * len(body)
        if add_generation_prompt:
            ids.append(self._id(tokenizer, self.roles["assistant"]))
            mask.append(False)
        return RenderedChat(ids, mask)
