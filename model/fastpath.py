"""GPT's cached forward with the module tree flattened away: the serving hot path.

A decode step of a small model is ~100 tiny operations; on a CPU the Python around them (nn.Module calls,
attribute lookups, no-op dropouts) costs as much as a fifth of the step. `FlatForward` reads the same
parameter tensors as the modules (no copies) into plain tuples once and runs exactly the operations of
`GPT._run` in the same order, so its outputs are bitwise equal to the module path; tests check that for
every layout switch. `GPT.forward_cached` uses it once `GPT.inference_layout()` has prepared the model.

On a CPU, float32 products of more than one row (batched decode, prefill, the LM head over a batch) go to
oneDNN's linear instead of MKL's: MKL repacks the whole weight matrix on every call, which at 8 rows costs as
much as the arithmetic (SmolLM2-135M's 49152 x 576 LM head about 2x slower, the layers 1.3-1.5x). oneDNN's
results differ from MKL's in the last bits, but a row's result is the same whatever other rows share its batch
of two or more. Single rows stay on F.linear: its matrix-vector product over the [in, out] layout is faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pocketgpt.model.kv_cache import CacheBatch, StaticBatch

if TYPE_CHECKING:
    from pocketgpt.model.gpt import GPT


def _norm(module: nn.Module) -> tuple:
    """(weight, bias or None, eps, is_layernorm) of an nn.LayerNorm or nn.RMSNorm."""
    if isinstance(module, nn.LayerNorm):
        return module.weight, module.bias, module.eps, True
    return module.weight, None, module.eps, False


def _apply_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """F.layer_norm / F.rms_norm without their Python wrappers (the same kernels)."""
    weight, bias, eps, layernorm = norm
    if layernorm:
        return torch.layer_norm(x, weight.shape, weight, bias, eps)
    return torch.rms_norm(x, weight.shape, weight, eps)


Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def onednn_linear(weight: torch.Tensor) -> Linear | None:
    """A linear that sends products of two or more rows to oneDNN, or None where that cannot serve `weight`.

    oneDNN's fused linear is a private ATen op (what torch.compile's CPU backend calls), so it is tried on a
    tiny product first and anything that goes wrong there (an old torch, a build without oneDNN) means None.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        w, x = torch.ones(3, 2), torch.ones(2, 2)
        if not torch.equal(op(x, w, None, "none", [], ""), torch.full((2, 3), 2.0)):
            return None
    except (AttributeError, RuntimeError):
        return None

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if x.numel() == x.size(-1):  # one row
            return F.linear(x, w, b)
        return op(x, w, b, "none", [], "")

    return linear


class FlatForward:
    """The inference forward of `model` over a KV cache, as straight-line tensor code.

    With `onednn` (default: where `onednn_linear` can serve the weights) multi-row products run on oneDNN;
    without it every product is F.linear, bitwise what the modules compute.
    """

    def __init__(self, model: GPT, onednn: bool | None = None) -> None:
        cfg = model.config
        fast = onednn_linear(model.lm_head.weight) if onednn is not False else None
        if onednn and fast is None:
            raise ValueError("oneDNN's linear is not available for this model's device and dtype")
        self.linear: Linear = fast or F.linear
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.layers = []
        for block in model.h:
            attn, mlp = block.attn, block.mlp
            gate = (mlp.c_gate.weight, mlp.c_gate.bias) if self.swiglu else None
            self.layers.append((
                _norm(block.ln_1), attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight, attn.c_proj.bias,
                _norm(block.ln_2), gate, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias,
            ))
        self.wte = model.wte.weight
        self.wpe = model.wpe.weight if model.wpe is not None else None
        self.rope = (model.rope_cos, model.rope_sin) if model.wpe is None else None
        self.ln_f = _norm(model.ln_f)
        self.lm_head = model.lm_head.weight

    def hidden(self, idx: torch.Tensor, batch: CacheBatch | StaticBatch) -> torch.Tensor:
        """Hidden states after the final norm for (B, C) tokens `idx`: `GPT._run` without the modules."""
        from pocketgpt.model.gpt import apply_rope, attend, split_heads  # a cycle at import time otherwise

        B, T = idx.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        linear = self.linear
        C = H * D
        positions = batch.positions
        x = F.embedding(idx, self.wte)
        rope = None
        if self.wpe is not None:
            x = x + F.embedding(positions, self.wpe)
        else:
            rope = (self.rope[0][positions].unsqueeze(1), self.rope[1][positions].unsqueeze(1))
        for layer, (ln_1, w_attn, b_attn, w_proj, b_proj, ln_2, gate, w_fc, b_fc, w_out, b_out) in enumerate(
            self.layers
        ):
            q, k, v = split_heads(linear(_apply_norm(x, ln_1), w_attn, b_attn), H, H_kv, D)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            k, v = batch.update(layer, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = attend(q, k, v, batch.mask, batch.is_causal)
            x = x + linear(y.transpose(1, 2).reshape(B, T, C), w_proj, b_proj)
            h = _apply_norm(x, ln_2)
            if gate is not None:
                h = F.silu(linear(h, *gate)) * linear(h, w_fc, b_fc)
            else:
                h = F.gelu(linear(h, w_fc, b_fc), approximate="tanh")
            x = x + linear(h, w_out, b_out)
        return _apply_norm(x, self.ln_f)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.lm_head, None)
