"""Weight-only int8 (model/quantize.py): accuracy bounds, the cached paths, refusals, and serving over HTTP."""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from pocketgpt.app import serve_cli
from pocketgpt.app.main import create_app
from pocketgpt.app.settings import Settings
from pocketgpt.app.testing import running_server
from pocketgpt.model.checkpoint import load_checkpoint, save_checkpoint
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.quantize import (
    Int8Linear,
    QuantizedModelError,
    apply_quantization,
    is_quantized,
    quantize_int8,
)
from tests.conftest import make_tiny_checkpoint
from tests.test_perf_paths import V, assert_equal, make_model, run_passes

QUANT_LAYOUTS = ["modern", "gpt2", "gpt2-tied", "gqa"]


def test_int8_linear_is_within_its_rounding_bound() -> None:
    """Error of one layer against the fp32 product, bounded by what the two roundings can cost.

    Each weight moves by at most half a step, scale_n / 2 = absmax_n / 254; the activations are rounded to
    bfloat16 for the kernel (relative error <= 2^-9) and so is its output (<= 2^-9 of |y|). So
    |y_n - ref_n| <= sum_k |x_k| absmax_n / 254 + 2^-9 sum_k |x_k w_nk| + 2^-9 |y_n| (plus fp32 accumulation,
    covered by the 1.1 factor). The bound is tight enough that a wrong scale or a transposed weight fails it.
    """
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (48, 64)
    x = torch.randn(5, 3, 64)
    ref = lin(x).detach()
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    w = lin.weight.detach()
    absmax = w.abs().amax(dim=1)
    bound = (x.abs() @ (absmax[:, None] / 254).expand_as(w).t() + 2**-9 * (x.abs() @ w.abs().t())
             + 2**-9 * ref.abs()) * 1.1
    assert ((got - ref).abs() <= bound).all()
    assert (got - ref).abs().max() > 0  # it really is quantized
    # It multiplies by exactly its dequantized weight: the bf16-rounded activations times qweight * scale, its
    # bf16 output (before the bias) off by at most one rounding, 2^-9 relative (2^-8 allows accumulation order).
    product = F.linear(x.bfloat16().float(), q.dequantized())
    assert ((got - lin.bias.detach() - product).abs() <= 2**-8 * product.abs() + 1e-6).all()


@pytest.mark.parametrize("layout", QUANT_LAYOUTS)
def test_int8_model_logits_are_close_to_fp32(layout: str) -> None:
    """The whole model: relative L2 error of the logits within 3% and the same greedy choice almost always.

    One layer's relative error is ~0.5% (see above); a 2-layer model stacks ~5 of them plus the LM head, so a
    few percent is the expected scale, and 3% fails a model where any layer is wrongly quantized."""
    ref = make_model(layout)
    q = quantize_int8(copy.deepcopy(ref))
    assert is_quantized(q) and not is_quantized(ref)
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == sum(isinstance(m, nn.Linear) for m in ref.modules())
    idx = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref(idx)[0], q(idx)[0]
    rel = (b - a).norm() / a.norm()
    assert 0 < rel < 0.03, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    if layout == "gpt2-tied":  # the embedding keeps its fp32 weights; the head has its own int8 copy
        assert torch.equal(q.wte.weight, ref.wte.weight) and isinstance(q.lm_head, Int8Linear)


@pytest.mark.parametrize("layout", QUANT_LAYOUTS)
def test_int8_fast_path_equals_int8_modules(layout: str) -> None:
    """prepare_inference's flat path runs the same int8 kernels as the modules: bitwise equal."""
    q = quantize_int8(make_model(layout))
    fast = copy.deepcopy(q).prepare_inference()
    assert fast._flat is not None
    run_passes(q, fast, assert_equal)


@pytest.mark.parametrize("layout", ["modern", "gpt2", "gqa"])
def test_int8_kv_cached_decode_equals_uncached(layout: str) -> None:
    """Greedy decode through the KV cache (prefill, then one token at a time, batched rows) picks the tokens an
    uncached full forward picks, with logits equal to bf16-kernel precision."""
    m = quantize_int8(make_model(layout)).prepare_inference()
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (7, 7, 7)]
    cache = KVCache.for_model(m, 3)
    logits = m.forward_cached(torch.tensor(seqs), cache, [0, 1, 2], [0, 0, 0])
    for _ in range(6):
        for row, s in enumerate(seqs):
            with torch.no_grad():
                want = m(torch.tensor([s]))[0][0, -1]
            # The kernel rounds its bf16 output: a tolerance of a few bf16 steps of the logits' scale.
            torch.testing.assert_close(logits[row], want, atol=2e-2 * want.abs().max().item(), rtol=0)
            assert int(logits[row].argmax()) == int(want.argmax())
            s.append(int(want.argmax()))
        logits = m.forward_cached(torch.tensor([[s[-1]] for s in seqs]), cache, [0, 1, 2],
                                  [len(s) - 1 for s in seqs])


def test_int8_decode_is_batch_invariant() -> None:
    """A row's int8 decode logits are the same alone or batched with others (the engine's invariance)."""
    m = quantize_int8(make_model("modern")).prepare_inference()
    cache = KVCache.for_model(m, 4)
    prompts = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(4))
    m.forward_cached(prompts, cache, [0, 1, 2, 3], [0] * 4)
    toks = torch.tensor([[5], [9], [11], [3]])
    together = m.forward_cached(toks, cache, [0, 1, 2, 3], [6] * 4)
    alone = m.forward_cached(toks[:1], cache, [0], [6])
    assert torch.equal(together[0], alone[0])


def test_quantized_models_are_never_saved(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    loaded = load_checkpoint(ckpt)
    assert not is_quantized(loaded.model)  # loading never quantizes: exports and training see fp weights
    apply_quantization(loaded.model, "int8")
    with pytest.raises(QuantizedModelError, match="cannot save a quantized model"):
        save_checkpoint(tmp_path / "out", loaded.model, loaded.tokenizer)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="quantize must be one of"):
        apply_quantization(loaded.model, "int4")


def test_unknown_quantize_values_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValidationError, match="quantize"):
        Settings(quantize="int4")
    monkeypatch.setenv("POCKETGPT_QUANTIZE", "fp8")
    with pytest.raises(ValidationError, match="'none' or 'int8'"):
        Settings()
    monkeypatch.delenv("POCKETGPT_QUANTIZE")
    rc = serve_cli.main(["generate", "--checkpoint", str(tmp_path), "--quantize", "int4", "hi"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("pocketgpt generate: invalid settings: quantize: ") and "'int8'" in err


def test_greedy_generation_over_http_with_int8(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """POCKETGPT_QUANTIZE=int8 serves the quantized model: its greedy text over HTTP (JSON and SSE) is the
    uncached greedy continuation of the same int8 model."""
    ckpt = make_tiny_checkpoint(tmp_path / "ck", tie_embeddings=False)
    monkeypatch.setenv("POCKETGPT_QUANTIZE", "int8")
    settings = Settings(checkpoint=ckpt)
    assert settings.quantize == "int8"
    ck = load_checkpoint(ckpt)
    model = quantize_int8(ck.model)
    prompt = "The quick brown fox"
    seq, ref = ck.tokenizer.encode(prompt), []
    with torch.no_grad():
        for _ in range(20):
            tok = int(model(torch.tensor([seq]))[0][0, -1].argmax())
            if tok == ck.tokenizer.eot_id:
                break
            ref.append(tok)
            seq.append(tok)
    body = {"prompt": prompt, "max_new_tokens": 20, "temperature": 0}
    with running_server(create_app(settings)) as url:
        r = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == ck.tokenizer.decode(ref)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ck.tokenizer.decode(ref)
