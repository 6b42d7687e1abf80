"""What the CPU's matrix-vector kernels allow: the floor under batch-1 decode, for each weight format.

    python -m bench.kernels [--out docs/benchmarks/kernels.json]

Batch-1 decode multiplies one activation row by every weight matrix once per token, so its speed is bounded
by how fast the kernels stream the weights. Measured on this machine, one torch thread unless named:
1. `stream`: the 6x384 decode model's weight matrices (bench.int8's shapes, [in, out] layout, about 56 MB,
   more than the last-level cache) multiplied in turn by one row, as GB/s of weights read, for 1 and 2 threads:
   the memory-bandwidth ceiling a decoder of that model meets, whoever wrote it.
2. `hot`: each shape alone, repeated (its weights stay in cache): fp32 `x @ W` against the int8 weight-only
   kernel (`aten._weight_int8pack_mm`, bfloat16 activations, what `--quantize int8` runs) and, when torchao is
   installed (`pip install 'pocketgpt[bench-torchao]'`), its int8 weight-only and dynamic-int8
   configurations: whether int8 arithmetic is any faster than fp32 once the weights are in cache.
   llama.cpp's q8_0 instead quantizes the activations too and runs hand-written integer SIMD dot products.

Medians of `--repeats` timings; ratios within one run are the result (the machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import machine_info, write_result

D, VOCAB, LAYERS = 384, 8192, 6
LAYER_SHAPES = [(D, 3 * D), (D, D), (D, 1024), (D, 1024), (1024, D)]  # qkv, out, gate, up, down: [in, out]


def _time(fn: Callable[[], Any], iters: int, repeats: int) -> float:
    """Median seconds per call of `fn`."""
    with torch.inference_mode():
        for _ in range(max(3, iters // 10)):
            fn()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            runs.append((time.perf_counter() - t0) / iters)
    return statistics.median(runs)


def stream_section(repeats: int) -> dict[str, Any]:
    """GB/s of weights read by one-row products over the whole model, at 1 and 2 threads."""
    weights = [torch.randn(k, n) for _ in range(LAYERS) for k, n in LAYER_SHAPES] + [torch.randn(D, VOCAB)]
    total = sum(w.numel() * 4 for w in weights)
    out: dict[str, Any] = {"weights_mb": round(total / 1e6, 1)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        pairs = [(torch.randn(1, w.size(0)), w) for w in weights]
        seconds = _time(lambda pairs=pairs: [x @ w for x, w in pairs], 20, repeats)
        out[f"threads_{threads}"] = {"ms_per_pass": round(seconds * 1e3, 2), "gb_s": round(total / seconds / 1e9, 1),
                                     "tok_s_ceiling": round(1 / seconds, 1)}
    torch.set_num_threads(1)
    return out


def _torchao_linears(k: int, n: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}
    out = {}
    for name, config in (("torchao_int8_weight_only", Int8WeightOnlyConfig()),
                         ("torchao_int8_dynamic", Int8DynamicActivationInt8WeightConfig())):
        layer = torch.nn.Linear(k, n, bias=False).eval()
        quantize_(layer, config)
        out[name] = layer
    return out


def hot_section(repeats: int) -> dict[str, Any]:
    """Microseconds per one-row product of each shape with its weights in cache, per kernel."""
    out: dict[str, Any] = {}
    for k, n in [*LAYER_SHAPES[:3], LAYER_SHAPES[4], (D, VOCAB)]:
        w = torch.randn(k, n)
        x = torch.randn(1, k)
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scales = torch.rand(n).to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        kernels: dict[str, Callable[[], Any]] = {
            "fp32": lambda x=x, w=w: x @ w,
            "int8_weight_only_bf16": lambda xb=xb, q=q, s=scales: torch.ops.aten._weight_int8pack_mm(xb, q, s),
        }
        for name, layer in _torchao_linears(k, n).items():
            kernels[name] = lambda layer=layer, x=x: layer(x)
        row = {name: round(_time(fn, 200, repeats) * 1e6, 1) for name, fn in kernels.items()}
        row.update({f"{name}_over_fp32": round(row["fp32"] / us, 3) for name, us in row.items() if name != "fp32"})
        out[f"{k}x{n}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks/kernels.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    record = {"benchmark": "bench.kernels", "command": "python -m bench.kernels",
              "note": "speeds over fp32: above 1 is faster than fp32", "stream": stream_section(args.repeats),
              "hot_us": hot_section(args.repeats), "machine": machine_info(1, "cpu")}
    write_result(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
