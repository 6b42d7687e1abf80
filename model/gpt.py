"""A decoder-only GPT whose switches hold both a modern (RoPE/RMSNorm/SwiGLU) and a GPT-2 layout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pocketgpt.model.config import ModelConfig
from pocketgpt.model.fastpath import FlatForward
from pocketgpt.model.kv_cache import CacheBatch, KVCache, StaticBatch


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The head_dim // 2 rotation frequencies, with Llama 3's scaling of the slow ones when configured."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    # 0 for wavelengths above original / low_freq_factor (scaled by 1/factor), 1 below original / high (kept).
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                                   - s.low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (block_size, head_dim // 2)."""
    inv_freq = rope_frequencies(cfg)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by per-position angles; cos/sin are (B or 1, 1, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def split_heads(qkv: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """(B, T, (H + 2 Hkv) D) fused projections -> q (B, H, T, D), k and v (B, Hkv, T, D): views, no copies."""
    B, T, _ = qkv.shape
    if n_kv_head == n_head:  # one view + permute instead of three (the decode hot path counts calls)
        return tuple(qkv.view(B, T, 3, n_head, head_dim).permute(2, 0, 3, 1, 4))
    q, k, v = qkv.split((n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim), dim=2)
    return (q.view(B, T, n_head, head_dim).transpose(1, 2), k.view(B, T, n_kv_head, head_dim).transpose(1, 2),
            v.view(B, T, n_kv_head, head_dim).transpose(1, 2))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, is_causal: bool = False,
           dropout: float = 0.0) -> torch.Tensor:
    """scaled_dot_product_attention where k/v may have fewer heads than q (each serving a group of q heads)."""
    B, H, T, D = q.shape
    n_kv = k.size(1)
    if n_kv == H:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
    if T == 1 and not is_causal:
        # Decode: a group's queries become the rows of one KV head's attention, which reads each key once
        # (the row mask, (B or 1, 1, 1, L), broadcasts over them). Much faster than enable_gqa with a mask on CPU.
        y = F.scaled_dot_product_attention(q.reshape(B, n_kv, H // n_kv, D), k, v, attn_mask=mask, dropout_p=dropout)
        return y.view(B, H, 1, D)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout, enable_gqa=True)
    # A chunk under an explicit mask: enable_gqa has no fast kernel for that, so repeat the KV heads.
    group = H // n_kv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        kv_width = cfg.kv_heads * cfg.head_dim
        # q, k and v in one matrix: n_embd query rows, then kv_width key rows and kv_width value rows.
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * kv_width, bias=cfg.bias or cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: CacheBatch | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = split_heads(self.c_attn(x), self.cfg.n_head, self.cfg.kv_heads, self.cfg.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            y = attend(q, k, v, is_causal=True, dropout=self.cfg.dropout if self.training else 0.0)
        else:
            k, v = cache.update(self.layer, k, v)
            y = attend(q, k.to(q.dtype), v.to(q.dtype), cache.mask, cache.is_causal)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        if self.swiglu:
            self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2 used the tanh approximation
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), CausalSelfAttention(cfg, layer)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: CacheBatch | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token embedding, `n_layer` pre-norm blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self._flat: FlatForward | None = None  # set by prepare_inference()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg)
            # Not persistent: derived from the config, so checkpoints carry only learned weights.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by depth so the residual stream's variance stays bounded.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def prepare_inference(self, transpose_weights: bool | None = None, onednn: bool | None = None) -> GPT:
        """Make a model that only serves ready for fast cached decoding; returns the model.

        `forward_cached` then runs `FlatForward` (the same operations without the module calls, bitwise
        equal). With `transpose_weights` (default: on CPU) every Linear weight is also stored as the transpose
        of a contiguous [in, out] matrix: same values and shapes, but F.linear then multiplies by a row-major
        [in, out] matrix, which runs decode's matrix-vector products much faster on CPU (the LM head of a
        384-wide, 8192-token model about 3x). Going back to training (`train()`) or moving the model drops the
        fast path; the layout only costs speed there. `onednn` (default: where available, CPU float32) runs
        products of two or more rows on oneDNN (see model/fastpath.py): equal within float rounding, not bitwise.
        """
        self.eval()
        if transpose_weights is None:
            transpose_weights = next(self.parameters()).device.type == "cpu"
        if transpose_weights:
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                        module.weight.data = module.weight.data.t().contiguous().t()
        self._flat = FlatForward(self, onednn)
        return self

    def train(self, mode: bool = True) -> GPT:
        if mode:
            self._flat = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): the flat path holds old tensors
        self._flat = None
        return super()._apply(fn, recurse)

    def _run(self, idx: torch.Tensor, positions: torch.Tensor, cache: CacheBatch | None) -> torch.Tensor:
        """Hidden states after the final norm; `positions` is (1 or B, T) absolute positions."""
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        x = self.drop(x)
        for block in self.h:
            x = block(x, rope, cache)
        return self.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full causal forward over (B, T) tokens: logits (B, T, V) and, given targets, the mean loss."""
        n = idx.size(1)
        if n > self.config.block_size:
            raise ValueError(f"sequence of {n} tokens exceeds the context length {self.config.block_size}")
        x = self._run(idx, torch.arange(n, device=idx.device).unsqueeze(0), None)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def forward_cached(
        self, idx: torch.Tensor, cache: KVCache, slots: list[int], starts: list[int], last_only: bool = True,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """Run (B, C) new tokens through the cache; row b goes to slot `slots[b]` from position `starts[b]`.

        Prefill is a chunk of C tokens per row (rows shorter than C padded at the end, their real counts in
        `lengths`); batched decode is C=1 with each row at its own position. Returns logits (B, V) for each
        row's last (real) token, or (B, C, V) with `last_only=False`. Padding writes keys past a row's end,
        which the row overwrites before it ever attends there.
        """
        return self.forward_batch(idx, cache.batch(slots, starts, idx.size(1)), last_only, lengths)

    @torch.inference_mode()
    def forward_batch(
        self, idx: torch.Tensor, batch: CacheBatch | StaticBatch, last_only: bool = True,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """`forward_cached` with the cache view already built (a StaticBatch for CUDA-graph decode steps)."""
        flat = self._flat
        x = flat.hidden(idx, batch) if flat is not None else self._run(idx, batch.positions, batch)
        if lengths is not None:
            x = x[torch.arange(x.size(0), device=x.device), torch.tensor(lengths, device=x.device) - 1]
        elif last_only:
            x = x[:, -1, :]
        return flat.logits(x) if flat is not None else self.lm_head(x)
