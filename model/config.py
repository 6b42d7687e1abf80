"""Model configuration: one typed dataclass, JSON round trip, and named presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

Positions = Literal["rope", "learned"]
Norm = Literal["rmsnorm", "layernorm"]
Mlp = Literal["swiglu", "gelu"]


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (`rope_scaling` with rope_type "llama3" in a Hugging Face config).

    Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` keep their frequency, those
    longer than `... / low_freq_factor` are slowed down by `factor`, and the band between is interpolated.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if not (self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
                and self.original_max_position_embeddings > 0):
            raise ValueError(f"invalid rope_scaling {self}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture switches of a decoder-only GPT.

    Defaults describe a modern layout (RoPE, RMSNorm, SwiGLU, no bias); the `gpt2` preset flips the switches
    to the original GPT-2 layout so the same code can hold imported GPT-2 weights. The remaining fields cover
    the Llama family (Llama 2/3, Qwen2, Mistral, SmolLM2, TinyLlama): grouped-query attention (`n_kv_head`),
    an explicit MLP width, biases on q/k/v only (Qwen2), untied embeddings and Llama 3's RoPE scaling.
    """

    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: one per query head
    n_embd: int = 128
    block_size: int = 256  # context length in tokens
    dropout: float = 0.0
    positions: Positions = "rope"
    norm: Norm = "rmsnorm"
    mlp: Mlp = "swiglu"
    bias: bool = False  # biases in every Linear and LayerNorm (GPT-2)
    qkv_bias: bool = False  # biases in the q/k/v projection only (Qwen2)
    mlp_width: int | None = None  # the MLP's hidden width; None: derived from n_embd (see mlp_hidden)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        checks = {
            "vocab_size": self.vocab_size > 0,
            "n_layer": self.n_layer > 0,
            "n_head": self.n_head > 0,
            "n_embd": self.n_embd > 0 and self.n_embd % max(self.n_head, 1) == 0,
            # Each key/value head serves a whole group of query heads.
            "n_kv_head": self.n_kv_head is None or (0 < self.n_kv_head <= self.n_head
                                                    and self.n_head % self.n_kv_head == 0),
            "mlp_width": self.mlp_width is None or self.mlp_width > 0,
            "rope_scaling": self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
            "block_size": self.block_size > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "positions": self.positions in ("rope", "learned"),
            "norm": self.norm in ("rmsnorm", "layernorm"),
            "mlp": self.mlp in ("swiglu", "gelu"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid model config field(s) {bad}: {self}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: what the KV cache stores per token and layer (times head_dim, for k and v)."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_width is not None:
            return self.mlp_width
        # SwiGLU has three matrices instead of two, so 2/3 of 4x keeps the parameter count comparable.
        if self.mlp == "swiglu":
            return 64 * ((int(8 * self.n_embd / 3) + 63) // 64)
        return 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {unknown}")
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict):
            data = {**data, "rope_scaling": RopeScaling(**scaling)}
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: dict[str, ModelConfig] = {
    # Trains in seconds on a CPU: for tests and smoke runs.
    "tiny": ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=128),
    # A few million parameters: minutes on 2 CPU cores, the starter model.
    "small": ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=256),
    # GPT-2 small (124M) shape and layout.
    "gpt2": ModelConfig(
        vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset, with any non-None overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides)
