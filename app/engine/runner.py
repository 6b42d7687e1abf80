"""The runner: the only part of the engine that touches tensors.

It owns the model, the slot KV cache, the prefix-cache block pool, the CUDA-graph decoder, the per-slot
penalty state and the token-healing masks, and it is the one place that decides what the model and device
support; structured output's grammar masks meet the logits here. `execute(plan)` runs a `StepPlan` (cached
prefix blocks copied in, one batched decode over the decoding rows, the planned prompt batches, newly
prefilled prompt blocks copied out to the pool) and samples every row that gets a token, each with its own
parameters and generator, in one call.
"""

from __future__ import annotations

import torch

from pocketgpt.app.engine import logprobs
from pocketgpt.app.engine.grammar import Constraint, allowed
from pocketgpt.app.engine.graphs import GraphDecoder
from pocketgpt.app.engine.plan import PrefillBatch, StepPlan
from pocketgpt.app.engine.prefix_cache import BlockPool
from pocketgpt.app.engine.scheduler import Sequence
from pocketgpt.app.engine.verify import verify_drafts
from pocketgpt.model.kv_cache import KVCache
from pocketgpt.model.sampling import sample
from pocketgpt.model.tokenizer import Tokenizer


class Runner:
    """Model + KV cache + sampling state for `n_slots` concurrent sequences.

    The model serves through GPT's interface: `prepare_inference()`, `forward_cached(..., last_only,
    lengths)` and, for CUDA-graph decode steps, `forward_batch`. What the runner makes of it (graphs or not,
    the cache's shape, dtype and device) is decided here and nowhere else; tests serve stand-ins that
    implement the same interface, and slow it down by subclassing (`app.testing.slowed`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, n_slots: int,
                 decode_graphs: bool | None = None, prefix_blocks: int = 0, prefix_block: int = 16,
                 compile_decode: bool = False) -> None:
        self.model = model.prepare_inference()  # the flat fast path (and [in, out] weights on CPU)
        self.tokenizer = tokenizer
        self.config = model.config
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache.for_model(self.model, n_slots=n_slots)
        # Decode steps from CUDA graphs on a GPU (default); on a CPU the same static step, compiled when asked
        # for (`compile_decode`), or run eagerly (tests), though the dynamic path is faster there uncompiled.
        if decode_graphs is None:
            decode_graphs = self.device.type == "cuda" or compile_decode
        self.graphs = GraphDecoder(self.model, self.cache, compiled=compile_decode) if decode_graphs else None
        if compile_decode and self.graphs is not None:
            self.graphs.warm_up()
        self.pool = BlockPool(self.cache, prefix_blocks, prefix_block) if prefix_blocks > 0 else None
        self._text_vocab = tokenizer.vocab_size  # ids beyond it (a padded embedding) are never sampled
        vocab = self.config.vocab_size
        # Penalty state per slot, kept on the device; only rows of penalized requests are kept up to date.
        self._counts = torch.zeros(n_slots, vocab, dtype=torch.int32, device=self.device)
        self._prompt_mask = torch.zeros(n_slots, vocab, dtype=torch.bool, device=self.device)
        self._heal_masks: dict[bytes, torch.Tensor] = {}  # token-healing prefix -> allowed first tokens

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def admit(self, seq: Sequence) -> None:
        """Reset a newly placed sequence's per-slot state (penalty counts and prompt mask)."""
        req = seq.request
        if req.params.penalized:
            self._counts[seq.slot].zero_()
            self._prompt_mask[seq.slot].zero_()
            self._prompt_mask[seq.slot, torch.tensor(req.prompt_ids, device=self.device)] = True

    def save_blocks(self, slot: int, blocks: list[tuple[int, int]]) -> None:
        """Copy positions of `slot` into prefix-cache pool blocks: [(pool block, start position)]."""
        self.pool.save(slot, blocks)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[list[int]]:
        """Run `plan`; return the tokens each of `plan.rows` gets, in order: one per row, or for a row with a
        draft the accepted draft tokens and the model's next one (empty if no row gets a token)."""
        for seq, blocks in plan.loads:
            self.pool.load(seq.slot, blocks)
        wide = self._decode_drafts(plan) if plan.drafts else None
        if wide is not None and self._text_vocab < wide.size(-1):
            wide[..., self._text_vocab :] = float("-inf")
        parts = [wide[:, 0] if wide is not None else self._decode(plan.decode)] if plan.decode else []
        for batch in plan.prefill:
            logits = self._prefill(batch)
            for i, c in enumerate(batch.chunks):
                if c.end == len(c.seq.request.prompt_ids):
                    parts.append(self._fork(c.seq, plan.forks[c.seq], logits[i : i + 1])
                                 if c.seq in plan.forks else logits[i : i + 1])
        for seq, blocks in plan.saves:
            self.pool.save(seq.slot, blocks)
        if not parts:
            return []  # only partial prompt chunks ran this step
        tokens = [[t] for t in self._sample(plan.rows, torch.cat(parts) if len(parts) > 1 else parts[0])]
        if wide is not None:
            verify_drafts(plan.decode, plan.drafts, wide, tokens)
        return tokens

    def _fork(self, leader: Sequence, followers: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Copy `leader`'s prompt keys into its followers' slots; its logits row once per choice (a copy: the
        sampler edits rows in place). The prompt's logprobs, when asked for, are shared the same way."""
        self.cache.copy_prefix(leader.slot, [f.slot for f in followers], len(leader.request.prompt_ids))
        for f in followers:
            f.prompt_logprobs = list(leader.prompt_logprobs)
        return logits.repeat(1 + len(followers), 1)

    def _decode(self, rows: list[Sequence]) -> torch.Tensor:
        slots, positions = [s.slot for s in rows], [s.pos for s in rows]
        if self.graphs is not None:
            return self.graphs.step(slots, [s.next_token for s in rows], positions)
        idx = torch.tensor([[s.next_token] for s in rows], device=self.device)
        return self.model.forward_cached(idx, self.cache, slots, positions)

    def _decode_drafts(self, plan: StepPlan) -> torch.Tensor:
        """Logits (rows, 1 + longest draft, V) of every decode row fed its token and its draft, as one batch
        (rows without a draft padded: their extra keys land past their position and are overwritten later)."""
        rows = plan.decode
        width = 1 + max(len(d) for d in plan.drafts.values())
        idx = []
        for s in rows:
            row = [s.next_token, *plan.drafts.get(s, ())]
            idx.append(row + [0] * (width - len(row)))
        return self.model.forward_cached(torch.tensor(idx, device=self.device), self.cache, [s.slot for s in rows],
                                         [s.pos for s in rows], last_only=False)

    def _prefill(self, batch: PrefillBatch) -> torch.Tensor:
        """Last-token logits of each chunk in `batch` (rows shorter than the batch are padded at the end).
        A batch of prompts that asked for their logprobs gets every position's logits and scores them."""
        width, lengths = batch.width, batch.lengths
        idx = torch.tensor([c.seq.request.prompt_ids[c.start : c.end] + [0] * (width - c.size)
                            for c in batch.chunks], device=self.device)
        slots, starts = [c.seq.slot for c in batch.chunks], [batch.start] * len(batch.chunks)
        if batch.all_positions:
            wide = self.model.forward_cached(idx, self.cache, slots, starts, last_only=False)
            self._score_prompt(batch, wide)
            return wide[torch.arange(len(lengths), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return self.model.forward_cached(idx, self.cache, slots, starts,
                                         **({"lengths": lengths} if min(lengths) < width else {}))

    def _score_prompt(self, batch: PrefillBatch, wide: torch.Tensor) -> None:
        """Append each chunk's prompt-token logprobs to its sequence: position j predicts prompt token
        start + j + 1 (the prompt's last position predicts the first output token, scored when sampled)."""
        for i, c in enumerate(batch.chunks):
            prompt = c.seq.request.prompt_ids
            if c.start == 0:
                c.seq.prompt_logprobs.append(None)  # nothing predicts the first token
            m = min(c.size, len(prompt) - 1 - c.start)
            if m <= 0:
                continue
            lp = logprobs.log_probs(wide[i, :m], self._text_vocab)
            targets = torch.tensor(prompt[c.start + 1 : c.start + 1 + m], device=self.device)
            c.seq.prompt_logprobs.extend(logprobs.gather(lp, targets, [c.seq.request.prompt_logprobs] * m))

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int]:
        if self._text_vocab < logits.size(1):
            logits[:, self._text_vocab :] = float("-inf")
        # Logprobs of the raw model distribution (see engine/logprobs.py): before healing, grammar masks and
        # penalties, so a constrained row reports what the model thought, not what the grammar allowed.
        asked = [i for i, s in enumerate(rows) if s.request.logprobs is not None]
        raw = logprobs.log_probs(logits[asked], self._text_vocab) if asked else None
        for i, seq in enumerate(rows):
            if seq.generated == 0 and seq.request.heal:
                logits[i].masked_fill_(~self._heal_mask(seq.request.heal), float("-inf"))
        constrained = [i for i, s in enumerate(rows) if s.request.constraint is not None]
        if constrained:  # structured output: only these rows pay for a grammar mask
            self._constrain(logits, [(i, rows[i].request.constraint) for i in constrained])
        params = [s.request.params for s in rows]
        penalized = any(p.penalized for p in params)
        counts = mask = slots = None
        if penalized:
            slots = torch.tensor([s.slot for s in rows], device=self.device)
            counts, mask = self._counts[slots], self._prompt_mask[slots]
        tokens = sample(logits, params, [s.generator for s in rows], counts, mask)
        if penalized:
            self._counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        if raw is not None:
            picked = logprobs.gather(raw, tokens[asked], [rows[i].request.logprobs for i in asked])
            for i, lp in zip(asked, picked, strict=True):
                rows[i].logprobs.append(lp)
        return tokens.tolist()  # the one host sync of the step (a second one only when a row asked for logprobs)

    def _constrain(self, logits: torch.Tensor, rows: list[tuple[int, Constraint]]) -> None:
        """Mask each constrained row's logits to the tokens its grammar allows next (computed on the CPU by the
        grammar library, one bit per token, then expanded on the logits' device)."""
        vocab = self._text_vocab
        bitmask = torch.zeros(len(rows), (vocab + 31) // 32, dtype=torch.int32)
        for j, (_, constraint) in enumerate(rows):
            constraint.fill(bitmask, j)
        ok = allowed(bitmask.to(self.device, non_blocking=True), vocab)
        for j, (i, _) in enumerate(rows):
            logits[i, :vocab].masked_fill_(~ok[j], float("-inf"))

    def _heal_mask(self, prefix: bytes) -> torch.Tensor:
        """Boolean (vocab,) mask of the tokens that may follow a healed prompt; built once per prefix."""
        mask = self._heal_masks.get(prefix)
        if mask is None:
            mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.device)
            mask[torch.tensor(self.tokenizer.ids_with_prefix(prefix), dtype=torch.long, device=self.device)] = True
            self._heal_masks[prefix] = mask
        return mask
