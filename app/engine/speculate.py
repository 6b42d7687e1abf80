"""N-gram (prompt-lookup) drafting for speculative decoding without a second model.

Text often repeats itself: code reuses names and lines, a summary quotes its source. So the next few tokens
are drafted by finding the most recent earlier occurrence of the last `n` tokens (n from `n_max` down to
`n_min`) in the request's own context (prompt and output so far) and copying what followed it (on into the
copy itself where the context ends, so a repeating loop is drafted k tokens ahead). The runner
checks a whole draft with one forward over its positions (`verify.py`: draft tokens are kept while they equal
what the request's own sampler draws, which leaves outputs exactly as without drafting), and a step yields up
to k + 1 tokens for little more than the cost of one where a step is memory-bound.

`adapt` keeps drafting where it pays: the draft length grows after a fully accepted draft, shrinks to what
was accepted otherwise, and after `patience` drafts in a row with nothing accepted the request stops
drafting for `pause` steps. Each further pause without an accepted token in between is twice as long (up to
`max_pause`), so a request whose drafts never land pays for a few probes, ever rarer, not for every step: a
verify forward over 1 + k positions costs a CPU about 1.5-2x a plain decode step (its matrix products run
k + 1 rows), which a draft that misses does not earn back.
"""

from __future__ import annotations

from pocketgpt.app.engine.types import GenRequest


def may_draft(request: GenRequest) -> bool:
    """Whether a request drafts. Greedy and sampled ones do (`verify.py` keeps both exact); penalized ones do
    not, since their penalty counts would have to change between a draft's positions within one step, and
    constrained ones do not, since their grammar mask applies only to the first position of a step, nor do
    ones that ask for logprobs, since the runner scores one sampled token per row and step."""
    return not request.params.penalized and request.constraint is None and request.logprobs is None


class NgramDrafter:
    """Drafts for one request from its token history (a list the caller keeps appending to)."""

    def __init__(self, history: list[int], k_max: int, n_max: int = 3, n_min: int = 2, patience: int = 1,
                 pause: int = 16, max_pause: int = 256, k_start: int = 2) -> None:
        self.history, self.k_max, self.n_max, self.n_min = history, k_max, n_max, n_min
        self.k = min(k_start, k_max)  # start short: a first draft that misses costs less; hits grow it
        self.patience, self.pause, self.max_pause = patience, pause, max_pause
        self._next_pause = pause  # doubles with every pause that no accepted token interrupts
        self._misses = 0
        self._paused = 0
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> where what followed its latest occurrence starts
        self._indexed = 0  # history[:_indexed] is in the index, except n-grams ending at its last token

    def propose(self, limit: int) -> list[int]:
        """Up to min(k, limit) draft tokens to follow the history; [] when paused or nothing matches."""
        self._catch_up()
        if self._paused > 0:
            self._paused -= 1
            return []
        k = min(self.k, limit)
        if k <= 0:
            return []
        h = self.history
        for n in range(min(self.n_max, len(h) - 1), self.n_min - 1, -1):
            start = self._index.get(tuple(h[-n:]))
            if start is not None:
                return self._copy(start, k)
        return []

    def _copy(self, start: int, k: int) -> list[int]:
        """k tokens copied from `start` on, running on into the copy itself where the history ends (as an
        LZ77 match may overlap its output): a loop of period p, whose latest earlier occurrence is only p
        tokens back, is drafted k tokens ahead rather than p (a small model's greedy output often loops)."""
        h, draft = self.history, []
        for i in range(start, start + k):
            draft.append(h[i] if i < len(h) else draft[i - len(h)])
        return draft

    def adapt(self, drafted: int, accepted: int) -> None:
        """Record how a draft of `drafted` tokens fared."""
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
        else:
            self.k = max(1, accepted + 1)
        if accepted > 0:
            self._misses, self._next_pause = 0, self.pause
            return
        self._misses += 1
        if self._misses >= self.patience:
            self._misses, self._paused = 0, self._next_pause
            self._next_pause = min(self.max_pause, 2 * self._next_pause)

    def _catch_up(self) -> None:
        # Index every n-gram that ends before the last token, so the latest earlier occurrence of the
        # history's own tail is what a lookup finds (never the tail itself).
        h = self.history
        for end in range(max(self._indexed, 1), len(h)):
            for n in range(self.n_min, self.n_max + 1):
                if end - n >= 0:
                    self._index[tuple(h[end - n : end])] = end
        self._indexed = len(h)
