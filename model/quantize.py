"""Weight-only int8 quantization of a GPT's Linear layers, for serving only.

Each Linear weight becomes int8 with one fp scale per output channel (symmetric, absmax / 127), and its
matrix product runs in PyTorch's own int8 weight-only kernel, `torch.ops.aten._weight_int8pack_mm` (CPU and
CUDA): no hand-written kernel. That kernel is fast for bfloat16/float16 activations but has only a scalar
fallback for float32 ones on CPU (measured ~100x slower than F.linear), so a float32 model's activations are
rounded to bfloat16 for the product alone; the residual stream, norms, attention and sampling stay in the
model's dtype. The embedding (tied to the LM head or not) stays as it is; the LM head gets its own int8 copy.

A quantized model is for inference: `save_checkpoint` refuses it (`assert_not_quantized`), so a checkpoint,
and everything exported from one, always holds the original weights.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_MODES = ("none", "int8")


class QuantizedModelError(ValueError):
    """Raised when quantized weights would be saved, trained or exported."""


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype `_weight_int8pack_mm` runs fast with: the model's half type, else bfloat16."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def int8_linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with weight = (qweight [out, in] int8, per-row scales): x @ (qweight * scales[:, None]).T + bias,
    for x of any leading shape; returns x's dtype."""
    qweight, scales = weight
    shape = x.shape
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(scales.dtype), qweight, scales)
    y = y.to(x.dtype).view(*shape[:-1], qweight.size(0))
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights (per output channel scales); same call signature."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        kernel_dtype = _kernel_dtype(w.dtype)
        wf = w.float()
        scales = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row keeps a finite scale
        qweight = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
        # Buffers, not Parameters: nothing here is trainable, and `.parameters()` lists only fp tensors.
        self.register_buffer("qweight", qweight.contiguous())  # [out, in], the layout the kernel expects
        self.register_buffer("scales", scales.to(kernel_dtype))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, (self.qweight, self.scales), self.bias)

    def dequantized(self) -> torch.Tensor:
        """The [out, in] float32 weight this layer multiplies by (for tests and error estimates)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, lm_head: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` (the LM head too, unless `lm_head=False`) by an Int8Linear, in place.

    A tied LM head gets its own int8 copy; the embedding it was tied to keeps its weights. Returns `model`,
    in eval mode; its fast inference path (`prepare_inference`) is rebuilt by the next call to it.
    """
    model.eval()
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and (lm_head or name != "lm_head")
    ]
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, Int8Linear(child))
    if hasattr(model, "_flat"):
        model._flat = None  # it held the float weights
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def assert_not_quantized(model: nn.Module, action: str = "save") -> None:
    """Refuse to `action` a model whose weights were quantized (they are lossy and serving-only)."""
    if is_quantized(model):
        raise QuantizedModelError(f"cannot {action} a quantized model: its int8 weights are for serving only; "
                                  "load the original checkpoint instead")


def apply_quantization(model: nn.Module, mode: str) -> nn.Module:
    """Quantize `model` as `mode` says (one of QUANTIZE_MODES); "none" leaves it as it is."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    return quantize_int8(model) if mode == "int8" else model
