"""The other sides of every decode comparison, all on the same weights as our model.

- `to_transformers`: the same state dict in Hugging Face's GPT2LMHeadModel (Conv1D weights are [in, out], so
  every Linear weight is transposed), checked against our logits before any timing.
- `naive_generate`: nanoGPT's `generate`: recompute the whole context for every new token, no cache.
- `BareDecoder`: a static-KV-cache loop written for one model layout and nothing else — pre-transposed weights,
  one preallocated cache, every row at the same position, greedy — the practical limit of eager PyTorch here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pocketgpt.model.gpt import GPT


# -- Hugging Face transformers ---------------------------------------------------------------------
def to_transformers(model: GPT):
    """A GPT2LMHeadModel holding `model`'s weights (GPT-2 layout only). Builds from a config: no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    if (cfg.positions, cfg.norm, cfg.mlp, cfg.bias) != ("learned", "layernorm", "gelu", True):
        raise ValueError("transformers' GPT-2 needs the gpt2 layout (learned, layernorm, gelu, bias)")
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, activation_function="gelu_new", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = GPT2LMHeadModel(hf_cfg)
    ours = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {
        "transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"], "transformer.ln_f.bias": ours["ln_f.bias"],
        "lm_head.weight": ours["lm_head.weight"],
    }
    for i in range(cfg.n_layer):
        for name in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                state[f"transformer.h.{i}.{name}.{p}"] = ours[f"h.{i}.{name}.{p}"]
        for ours_name, hf_name in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                                   ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            state[f"transformer.h.{i}.{hf_name}.weight"] = ours[f"h.{i}.{ours_name}.weight"].t().contiguous()
            state[f"transformer.h.{i}.{hf_name}.bias"] = ours[f"h.{i}.{ours_name}.bias"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return hf.to(next(model.parameters()).device).eval()


@torch.inference_mode()
def logits_max_diff(model: GPT, hf, idx: torch.Tensor) -> float:
    """Largest |difference| between our logits and transformers' for the same tokens."""
    ours, _ = model(idx)
    theirs = hf(idx).logits
    return float((ours.float() - theirs.float()).abs().max())


@torch.inference_mode()
def hf_generate(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy `generate()` with transformers' KV cache: exactly `n` new tokens."""
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, use_cache=True)[0, prompt.size(1) :]


# -- nanoGPT's way ---------------------------------------------------------------------------------
@torch.inference_mode()
def naive_generate(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding that runs the full forward over the (cropped) context for every token."""
    idx = prompt
    for _ in range(n):
        cond = idx[:, -model.config.block_size :]
        logits, _ = model(cond)
        idx = torch.cat((idx, logits[:, -1, :].argmax(-1, keepdim=True)), dim=1)
    return idx[0, prompt.size(1) :]


# -- the bare static-KV-cache loop -----------------------------------------------------------------
class BareDecoder:
    """Greedy decoding of B rows in lockstep for the GPT-2 layout, with nothing but the tensor operations."""

    def __init__(self, model: GPT, batch: int, max_len: int) -> None:
        cfg = model.config
        self.H, self.D, self.C, self.eps = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.norm_eps

        def t(w: torch.Tensor) -> torch.Tensor:  # [out, in] -> contiguous [in, out]
            return w.detach().t().contiguous()

        self.layers = [
            (b.ln_1.weight, b.ln_1.bias, t(b.attn.c_attn.weight), b.attn.c_attn.bias, t(b.attn.c_proj.weight),
             b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, t(b.mlp.c_fc.weight), b.mlp.c_fc.bias,
             t(b.mlp.c_proj.weight), b.mlp.c_proj.bias)
            for b in model.h
        ]
        self.ln_f = (model.ln_f.weight, model.ln_f.bias)
        self.wte, self.wpe = model.wte.weight.detach(), model.wpe.weight.detach()
        self.head = t(model.lm_head.weight)
        p = model.wte.weight
        self.k = torch.zeros(cfg.n_layer, batch, self.H, max_len, self.D, device=p.device, dtype=p.dtype)
        self.v = torch.zeros_like(self.k)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed (B,) tokens at position `pos`; return the (B,) greedy next tokens."""
        B, C, H, D = tokens.size(0), self.C, self.H, self.D
        x = self.wte[tokens] + self.wpe[pos]
        for i, (w1, b1, wa, ba, wo, bo, w2, b2, wf, bf, wp, bp) in enumerate(self.layers):
            q, k, v = torch.addmm(ba, F.layer_norm(x, (C,), w1, b1, self.eps), wa).view(B, 3, H, D).unbind(1)
            self.k[i, :, :, pos] = k
            self.v[i, :, :, pos] = v
            y = F.scaled_dot_product_attention(q.unsqueeze(2), self.k[i, :, :, : pos + 1], self.v[i, :, :, : pos + 1])
            x = torch.addmm(bo, y.view(B, C), wo).add_(x)
            h = F.gelu(torch.addmm(bf, F.layer_norm(x, (C,), w2, b2, self.eps), wf), approximate="tanh")
            x = torch.addmm(bp, h, wp).add_(x)
        return (F.layer_norm(x, (C,), *self.ln_f, self.eps) @ self.head).argmax(-1)

    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        """Prefill (B, T) prompts token by token, then decode `n` tokens; returns (B, n)."""
        out = []
        for pos in range(prompt.size(1)):
            nxt = self.step(prompt[:, pos], pos)
        pos = prompt.size(1)
        for _ in range(n):
            out.append(nxt)
            if len(out) == n:
                break
            nxt = self.step(nxt, pos)
            pos += 1
        return torch.stack(out, dim=1)
