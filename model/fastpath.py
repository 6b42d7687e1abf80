"""GPT's cached forward with the module tree flattened away: the serving hot path.

A decode step of a small model is ~100 tiny operations; on a CPU the Python around them (nn.Module calls,
attribute lookups, no-op dropouts) costs as much as a fifth of the step. `FlatForward` reads the same
parameter tensors as the modules (no copies) into plain tuples once and runs exactly the operations of
`GPT._run` in the same order, so its outputs are bitwise equal to the module path; tests check that for
every layout switch. `GPT.forward_cached` uses it once `GPT.inference_layout()` has prepared the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pocketgpt.model.kv_cache import CacheBatch, StaticBatch
from pocketgpt.model.quantize import int8_linear

if TYPE_CHECKING:
    from pocketgpt.model.gpt import GPT


def _norm(module: nn.Module) -> tuple:
    """(weight, bias or None, eps, is_layernorm) of an nn.LayerNorm or nn.RMSNorm."""
    if isinstance(module, nn.LayerNorm):
        return module.weight, module.bias, module.eps, True
    return module.weight, None, module.eps, False


def _linear(module: nn.Module) -> tuple:
    """(function, weight, bias) computing `module(x)` as function(x, weight, bias): F.linear or an int8 kernel."""
    if isinstance(module, nn.Linear):
        return F.linear, module.weight, module.bias
    return int8_linear, (module.qweight, module.scales), module.bias  # model.quantize.Int8Linear


def _apply_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """F.layer_norm / F.rms_norm without their Python wrappers (the same kernels)."""
    weight, bias, eps, layernorm = norm
    if layernorm:
        return torch.layer_norm(x, weight.shape, weight, bias, eps)
    return torch.rms_norm(x, weight.shape, weight, eps)


class FlatForward:
    """The inference forward of `model` over a KV cache, as straight-line tensor code."""

    def __init__(self, model: GPT) -> None:
        cfg = model.config
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.layers = []
        for block in model.h:
            attn, mlp = block.attn, block.mlp
            gate = _linear(mlp.c_gate) if self.swiglu else None
            self.layers.append((
                _norm(block.ln_1), _linear(attn.c_attn), _linear(attn.c_proj),
                _norm(block.ln_2), gate, _linear(mlp.c_fc), _linear(mlp.c_proj),
            ))
        self.wte = model.wte.weight
        self.wpe = model.wpe.weight if model.wpe is not None else None
        self.rope = (model.rope_cos, model.rope_sin) if model.wpe is None else None
        self.ln_f = _norm(model.ln_f)
        self.lm_head = _linear(model.lm_head)

    def hidden(self, idx: torch.Tensor, batch: CacheBatch | StaticBatch) -> torch.Tensor:
        """Hidden states after the final norm for (B, C) tokens `idx`: `GPT._run` without the modules."""
        from pocketgpt.model.gpt import apply_rope, attend, split_heads  # a cycle at import time otherwise

        B, T = idx.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        C = H * D
        positions = batch.positions
        x = F.embedding(idx, self.wte)
        rope = None
        if self.wpe is not None:
            x = x + F.embedding(positions, self.wpe)
        else:
            rope = (self.rope[0][positions].unsqueeze(1), self.rope[1][positions].unsqueeze(1))
        # Each linear is (function, weight, bias): F.linear's or, in a quantized model, the int8 kernel's.
        for layer, (ln_1, (attn_f, attn_w, attn_b), (proj_f, proj_w, proj_b), ln_2, gate, (fc_f, fc_w, fc_b),
                    (out_f, out_w, out_b)) in enumerate(self.layers):
            q, k, v = split_heads(attn_f(_apply_norm(x, ln_1), attn_w, attn_b), H, H_kv, D)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            k, v = batch.update(layer, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = attend(q, k, v, batch.mask, batch.is_causal)
            x = x + proj_f(y.transpose(1, 2).reshape(B, T, C), proj_w, proj_b)
            h = _apply_norm(x, ln_2)
            if gate is not None:
                h = F.silu(gate[0](h, gate[1], gate[2])) * fc_f(h, fc_w, fc_b)
            else:
                h = F.gelu(fc_f(h, fc_w, fc_b), approximate="tanh")
            x = x + out_f(h, out_w, out_b)
        return _apply_norm(x, self.ln_f)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        f, weight, bias = self.lm_head
        return f(x, weight, bias)
