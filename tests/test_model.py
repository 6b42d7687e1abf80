"""The GPT network and its slot KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pocketgpt.model.config import PRESETS, ModelConfig, RopeScaling, preset
from pocketgpt.model.gpt import GPT, rope_frequencies
from pocketgpt.model.kv_cache import KVCache

LAYOUTS = {
    "modern": ModelConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=96),
    "gpt2": ModelConfig(
        vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=96,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False,
    ),
    # Llama-family switches: grouped-query attention (2 KV heads for 4 query heads), multi-query attention,
    # and Qwen2's q/k/v-only biases with untied embeddings, an explicit MLP width and Llama 3 RoPE scaling.
    "gqa": ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=96, mlp_width=48),
    "mqa": ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=1, n_embd=32, block_size=96),
    "qwen2": ModelConfig(
        vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=96, qkv_bias=True,
        tie_embeddings=False, rope_theta=1e6, norm_eps=1e-6,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=32),
    ),
}


@pytest.fixture(params=sorted(LAYOUTS))
def model(request) -> GPT:
    torch.manual_seed(0)
    m = GPT(LAYOUTS[request.param]).eval()
    # Random init gives near-uniform logits; sharpen so argmax comparisons are meaningful.
    with torch.no_grad():
        m.wte.weight.mul_(20)
        for name, p in m.named_parameters():
            if name.endswith("c_attn.bias"):
                p.normal_(std=0.5)  # zero-initialised: make the q/k/v biases count
    return m


def test_causality(model: GPT) -> None:
    idx = torch.randint(0, 97, (2, 40))
    logits, _ = model(idx)
    for t in (0, 10, 39):
        changed = idx.clone()
        if t + 1 < idx.size(1):
            changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
        other, _ = model(changed)
        assert torch.allclose(logits[:, : t + 1], other[:, : t + 1], atol=1e-6)
    # And the test can fail: changing token t does change logits at t.
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 97
    assert not torch.allclose(model(changed)[0][:, 5], logits[:, 5])


def _greedy_uncached(model: GPT, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    seq, all_logits = list(prompt), []
    for _ in range(steps):
        logits, _ = model(torch.tensor([seq]))
        all_logits.append(logits[0, -1])
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :], all_logits


def test_cached_decode_equals_uncached(model: GPT) -> None:
    prompt = torch.randint(0, 97, (13,)).tolist()
    ref_tokens, ref_logits = _greedy_uncached(model, prompt, 50)
    cache = KVCache.for_model(model, n_slots=2)
    # Prefill in two chunks, into slot 1, to exercise chunked prefill at an offset.
    model.forward_cached(torch.tensor([prompt[:5]]), cache, [1], [0])
    logits = model.forward_cached(torch.tensor([prompt[5:]]), cache, [1], [5])
    tokens = []
    for i in range(50):
        assert (logits[0] - ref_logits[i]).abs().max().item() < 1e-4
        tok = int(logits[0].argmax())
        tokens.append(tok)
        logits = model.forward_cached(torch.tensor([[tok]]), cache, [1], [len(prompt) + i])
    assert tokens == ref_tokens


def test_batched_decode_slots_at_different_lengths(model: GPT) -> None:
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 17, 30)]
    refs = [_greedy_uncached(model, p, 50) for p in prompts]
    cache = KVCache.for_model(model, n_slots=4)
    slots = [3, 0, 2]  # deliberately not contiguous
    last = []
    for slot, p in zip(slots, prompts, strict=True):
        last.append(model.forward_cached(torch.tensor([p]), cache, [slot], [0])[0])
    logits = torch.stack(last)
    pos = [len(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    for step in range(50):
        for b, (_, ref_logits) in enumerate(refs):
            assert (logits[b] - ref_logits[step]).abs().max().item() < 1e-4
        toks = logits.argmax(-1)
        for b in range(3):
            outs[b].append(int(toks[b]))
        logits = model.forward_cached(toks.unsqueeze(1), cache, slots, pos)
        pos = [p + 1 for p in pos]
    assert outs == [r[0] for r in refs]


def test_cache_overflow_is_refused() -> None:
    m = GPT(LAYOUTS["modern"]).eval()
    cache = KVCache.for_model(m, n_slots=1, max_len=8)
    with pytest.raises(ValueError, match="cache holds 8"):
        m.forward_cached(torch.zeros(1, 9, dtype=torch.long), cache, [0], [0])


def test_forward_rejects_too_long_sequence() -> None:
    m = GPT(LAYOUTS["modern"])
    with pytest.raises(ValueError, match="context length 96"):
        m(torch.zeros(1, 97, dtype=torch.long))


def test_config_json_round_trip_and_presets(tmp_path) -> None:
    cfg = preset("tiny", vocab_size=300)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
    assert set(PRESETS) >= {"tiny", "small", "gpt2"}
    gpt2 = GPT(PRESETS["gpt2"])
    assert 123_000_000 < gpt2.num_params() < 126_000_000  # the 124M shape
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_dict({"n_layers": 3})


def test_tiny_model_overfits_repeated_text() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=64, block_size=32)
    m = GPT(cfg)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3] * 4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        starts = torch.randint(0, len(pattern) - 33, (8,))
        x = torch.stack([pattern[s : s + 32] for s in starts])
        y = torch.stack([pattern[s + 1 : s + 33] for s in starts])
        _, loss = m(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.2


def test_gqa_shapes_and_kv_cache_holds_only_the_kv_heads() -> None:
    gqa, mha = LAYOUTS["gqa"], LAYOUTS["gqa"].with_overrides(n_kv_head=4)
    m = GPT(gqa)
    assert m.h[0].attn.c_attn.weight.shape == (32 + 2 * 2 * 8, 32)  # q: 4 heads of 8, k and v: 2 heads each
    assert m.h[0].mlp.c_fc.weight.shape == (48, 32)  # the explicit MLP width
    small, full = KVCache.for_model(m, n_slots=1), KVCache.for_model(GPT(mha), n_slots=1)
    assert small.k.shape[2] == 2 and full.k.shape[2] == 4
    assert small.k.numel() * 2 == full.k.numel()
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)


def test_qkv_bias_and_untied_embeddings() -> None:
    m = GPT(LAYOUTS["qwen2"])
    attn = m.h[0].attn
    assert attn.c_attn.bias is not None and attn.c_proj.bias is None and m.h[0].mlp.c_fc.bias is None
    assert m.lm_head.weight.data_ptr() != m.wte.weight.data_ptr()


def test_llama3_rope_scaling_keeps_fast_and_slows_slow_frequencies() -> None:
    cfg = ModelConfig(n_head=1, n_embd=64, rope_theta=500000.0,
                      rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8192))
    plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
    scaled = rope_frequencies(cfg)
    wavelen = 2 * torch.pi / plain
    fast, slow = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
    assert fast.any() and slow.any() and not (fast & slow).any()
    assert torch.equal(scaled[fast], plain[fast])
    torch.testing.assert_close(scaled[slow], plain[slow] / 8.0)
    middle = ~fast & ~slow
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8.0)).all()


def test_new_config_fields_round_trip(tmp_path) -> None:
    cfg = LAYOUTS["qwen2"]
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg
