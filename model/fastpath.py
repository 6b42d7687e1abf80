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
from pocketgpt.model.quantize import int8_linear

if TYPE_CHECKING:
    from pocketgpt.model.gpt import GPT


Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _norm(module: nn.Module) -> tuple:
    """(weight, bias or None, eps, is_layernorm) of an nn.LayerNorm or nn.RMSNorm."""
    if isinstance(module, nn.LayerNorm):
        return module.weight, module.bias, module.eps, True
    return module.weight, None, module.eps, False


def _linear(module: nn.Module, dense: Linear = F.linear) -> tuple:
    """(function, weight, bias) computing `module(x)` as function(x, weight, bias): `dense` (F.linear or the
    oneDNN linear) for a float Linear, the int8 kernel for a quantized one."""
    if isinstance(module, nn.Linear):
        return dense, module.weight, module.bias
    return int8_linear, (module.qweight, module.scales), module.bias  # model.quantize.Int8Linear


def _apply_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """F.layer_norm / F.rms_norm without their Python wrappers (the same kernels)."""
    weight, bias, eps, layernorm = norm
    if layernorm:
        return torch.layer_norm(x, weight.shape, weight, bias, eps)
    return torch.rms_norm(x, weight.shape, weight, eps)


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
        head = getattr(model.lm_head, "weight", None)  # None: an int8 head (model.quantize), no float products
        fast = onednn_linear(head) if onednn is not False and head is not None else None
        if onednn and fast is None:
            raise ValueError("oneDNN's linear is not available for this model's device and dtype")
        self.linear: Linear = fast or F.linear
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.layers = []
        for block in model.h:
            attn, mlp = block.attn, block.mlp
            gate = _linear(mlp.c_gate, self.linear) if self.swiglu else None
            self.layers.append((
                _norm(block.ln_1), _linear(attn.c_attn, self.linear), _linear(attn.c_proj, self.linear),
                _norm(block.ln_2), gate, _linear(mlp.c_fc, self.linear), _linear(mlp.c_proj, self.linear),
            ))
        self.wte = model.wte.weight
        self.wpe = model.wpe.weight if model.wpe is not None else None
        self.rope = (model.rope_cos, model.rope_sin) if model.wpe is None else None
        self.ln_f = _norm(model.ln_f)
        self.lm_head = _linear(model.lm_head, self.linear)

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
