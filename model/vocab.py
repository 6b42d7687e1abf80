"""Growing a model's vocabulary when tokens are added to its tokenizer (e.g. a chat template's markers)."""

from __future__ import annotations

import torch

from pocketgpt.model.gpt import GPT


@torch.no_grad()
def add_token_rows(model: GPT, old_vocab: int, new_vocab: int) -> GPT:
    """A copy of `model` whose token ids [old_vocab, new_vocab) get fresh embedding (and LM-head) rows.

    `old_vocab` is the tokenizer's size before the tokens were added. The table grows when `new_vocab` exceeds
    the model's `vocab_size`; a table that was already padded past `new_vocab` keeps its size. New rows start
    at the mean of the trained rows [0, old_vocab): an average input the network already knows how to process,
    and, through the LM head, logits no larger than a typical token's, so the added tokens neither blow up the
    first steps nor start out as likely predictions.
    """
    if not 0 < old_vocab <= new_vocab:
        raise ValueError(f"need 0 < old_vocab ({old_vocab}) <= new_vocab ({new_vocab})")
    cfg = model.config
    new = GPT(cfg.with_overrides(vocab_size=max(cfg.vocab_size, new_vocab)))
    param = next(model.parameters())
    new.to(device=param.device, dtype=param.dtype)
    state = model.state_dict()
    for name in ("wte.weight", "lm_head.weight"):
        if name == "lm_head.weight" and cfg.tie_embeddings:
            state[name] = state["wte.weight"]  # tied: the same (grown) tensor
            continue
        old = state[name]
        grown = torch.empty(new.config.vocab_size, old.size(1), dtype=old.dtype, device=old.device)
        grown[: old.size(0)] = old
        grown[old_vocab:new_vocab] = old[:old_vocab].mean(dim=0)
        state[name] = grown
    new.load_state_dict(state)
    new.train(model.training)
    return new
