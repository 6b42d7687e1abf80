"""Auto-configuration: the model shape, vocabulary, batch and learning rate for a corpus, a budget and a machine.

Rules, in order (training.autoplan measures what they need and applies the result):
1. Script, from character classes of a sample: CJK (Han, kana, hangul), code (symbol-dense lines) or Latin.
2. Vocabulary, from the corpus size: about eight token types per kilobyte of text (1 MB -> 8,192), a power of
   two from 512 to 8,192; for CJK, enough types to hold the characters that make up 99% of the text as whole
   tokens (a character model's alphabet), because byte pieces of a character teach the model little.
3. Shape: the largest candidate of the device's ladder that still sees `TOKENS_PER_PARAM` (0.5) training tokens per
   non-embedding parameter in the budget, at the throughput measured by a short probe on this machine (shapes
   not probed are estimated from the probed ones' FLOP rates). Short budgets and slow machines get small models.
4. Vocabulary capped by width (at most 64 types per dimension, 32 for CJK): a wide table on a narrow model is
   mostly untrained rows that cost head compute (see TYPES_PER_DIM for what was measured).
5. Learning rate: 1.5e-3 at width 128 on a CPU (3e-3 on a GPU), scaled by 1/sqrt(width/128), to min_lr = lr/10.
   Dropout 0 unless the budget passes over the data more than `DROPOUT_EPOCHS` times (then 0.1): short runs do
   not overfit. Evaluation batches: 8 for budgets under ~10 minutes (the final evaluation is paid for inside the
   budget), else 20.

The module is arithmetic only (no torch), so its rules are unit-tested without training anything.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK = re.compile(f"[{CJK_RANGES}]")
_CODE_SYMBOLS = re.compile(r"[{}()\[\];=<>_#:\"'`|&*+\-/\\]")
# Training tokens per non-embedding parameter aimed at. On Tiny Shakespeare at 130 s (docs/benchmarks/budget-trials),
# 4x128 at ~0.9 tokens per parameter beat 2x96 at ~3: at these budgets a bigger model learns faster per token.
TOKENS_PER_PARAM = 0.5
DROPOUT_EPOCHS = 4.0
ASSUMED_BUDGET_S = 600.0  # what the plan sizes for when no --max-time is given
PLANNED_FIELDS = ("tokenizer_vocab", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "lr", "min_lr",
                  "dropout", "eval_batches")


@dataclass(frozen=True)
class Shape:
    """A candidate model shape and its batch."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int

    @property
    def key(self) -> str:
        return f"{self.n_layer}x{self.n_embd}"

    def mlp_hidden(self) -> int:
        return 64 * ((int(8 * self.n_embd / 3) + 63) // 64)  # SwiGLU's, as model.config computes it

    def body_params(self) -> int:
        """Non-embedding parameters: attention (4 C^2) and SwiGLU (3 C H) per layer."""
        c = self.n_embd
        return self.n_layer * (4 * c * c + 3 * c * self.mlp_hidden())

    def flops_per_token(self, vocab: int) -> float:
        """Training FLOPs per token: 6 x (body + output head) + attention's 12 L T C."""
        return 6 * (self.body_params() + vocab * self.n_embd) + 12 * self.n_layer * self.block_size * self.n_embd


# Ladders of candidate shapes, smallest first; head dim 32 on a CPU (cheap attention), 64 on a GPU.
# CPU batch 8: on both benchmark corpora at 130 s, batch 8 (twice the optimizer steps for the same tokens) scored
# better than 16 (docs/benchmarks/budget-trials 14, 18 against 11).
CPU_LADDER = (
    Shape(2, 3, 96, 128, 8),
    Shape(4, 4, 128, 128, 8),
    Shape(4, 6, 192, 128, 8),
    Shape(6, 8, 256, 256, 8),
    Shape(8, 6, 384, 256, 8),
)
GPU_LADDER = (
    Shape(4, 4, 256, 256, 64),
    Shape(6, 6, 384, 256, 64),
    Shape(8, 8, 512, 512, 64),
    Shape(12, 12, 768, 512, 32),
    Shape(16, 16, 1024, 1024, 32),
)
ASSUMED_FLOPS = {"cpu": 3e10, "cuda": 1e14, "mps": 1e12}  # before the probe: where to look on the ladder
# Peak learning rate at width 128. CPU: 1.5e-3 beat 3e-3, which beat 6e-3, on both corpora at 130 s (budget-trials
# 17, 11, 13; then 18 with batch 8); the GPU ladder (bigger batches) keeps 3e-3, not measured.
BASE_LR = {"cpu": 1.5e-3, "mps": 1.5e-3, "cuda": 3e-3}
# Vocabulary per dimension of width (rule 4). CJK: whole characters (4,096 types at width 128) scored better than
# 1,024 or 2,048 types on Tang poems at 130 s once each run had a core to itself (budget-trials 16, 13, 11), and
# better than 8,192 (trials 20, 23: 2.52 against 2.63 bits per byte). Latin: on Tiny Shakespeare 8,192 types beat
# 4,096 and 1,024 at 60, 130 and 600 s, at widths 128 and 192, on an idle machine (trials 20, 22: at 600 s 2.30,
# 2.40 and 2.43 bits per byte), although the bigger head costs steps; why is not measured (fewer tokens per byte,
# whole words for the held-out tail's names). Rule 2's 8 per kB gives a 1 MB corpus that; 64 per dimension lets
# width 128 have it.
TYPES_PER_DIM = {"cjk": 32}
DEFAULT_TYPES_PER_DIM = 64


@dataclass
class PlanInputs:
    corpus_bytes: int
    script: str  # "latin" | "code" | "cjk"
    budget_s: float | None  # --max-time
    device: str  # "cpu" | "cuda" | "mps"
    cjk_vocab: int | None = None  # CJK: token types to hold 99% of the text's characters whole


@dataclass
class PlanRow:
    name: str
    value: Any
    why: str


def detect_script(sample: str) -> str:
    """"cjk", "code" or "latin" from character classes of a text sample."""
    letters = sum(ch.isalnum() for ch in sample)
    if letters and len(_CJK.findall(sample)) / letters > 0.3:
        return "cjk"
    visible = sum(not ch.isspace() for ch in sample)
    if visible and len(_CODE_SYMBOLS.findall(sample)) / visible > 0.12:
        return "code"
    return "latin"


def cjk_vocab_for(sample: str, coverage: float = 0.99) -> int:
    """Token types for a CJK text: its most frequent characters covering `coverage` of them, plus bytes."""
    counts = Counter(_CJK.findall(sample))
    total, covered, need = sum(counts.values()), 0, 0
    for _, n in counts.most_common():
        if covered >= coverage * total:
            break
        covered, need = covered + n, need + 1
    return need + 256 + 64  # bytes for everything else, and room for common pairs


def _pow2(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 2 ** round(math.log2(max(x, 1.0))))))


def vocab_for(inputs: PlanInputs) -> tuple[int, str]:
    """(vocabulary, why) from the corpus size and script, before the width cap."""
    mb = inputs.corpus_bytes / 1e6
    if inputs.script == "cjk" and inputs.cjk_vocab:
        v = int(min(8192, max(1024, 256 * math.ceil(inputs.cjk_vocab / 256))))
        return v, f"CJK: {inputs.cjk_vocab - 320:,} characters make 99% of the text -> whole-character tokens"
    v = _pow2(8 * inputs.corpus_bytes / 1000, 512, 8192)
    return v, f"corpus {mb:.1f} MB of {inputs.script} -> about 8 token types per kB"


def capped_vocab(script: str, vocab: int, n_embd: int) -> int:
    """Rule 4: the vocabulary a model of width `n_embd` gets (the probe measures each shape with its own)."""
    per_dim = TYPES_PER_DIM.get(script, DEFAULT_TYPES_PER_DIM)
    return vocab if vocab <= per_dim * n_embd else _pow2(per_dim * n_embd, 512, 8192)


def train_seconds(inputs: PlanInputs) -> float:
    """Training time the plan sizes for: the budget less planning, data preparation and the final save."""
    budget = inputs.budget_s if inputs.budget_s is not None else ASSUMED_BUDGET_S
    return max(5.0, 0.85 * budget)


def ladder(device: str) -> tuple[Shape, ...]:
    return GPU_LADDER if device == "cuda" else CPU_LADDER


def first_guess(inputs: PlanInputs, vocab: int) -> int:
    """Index on the ladder that the rule picks with the device's assumed FLOP rate (what to probe around)."""
    rate = ASSUMED_FLOPS.get(inputs.device, ASSUMED_FLOPS["cpu"])
    shapes = ladder(inputs.device)
    flops = {s.key: s.flops_per_token(capped_vocab(inputs.script, vocab, s.n_embd)) for s in shapes}
    return choose_shape(inputs, vocab, {s.key: rate / flops[s.key] for s in shapes})[0]


def estimate_tokens_per_s(shapes: tuple[Shape, ...], vocab: int, measured: dict[str, float],
                          script: str = "latin") -> dict[str, float]:
    """Tokens/s for every shape: measured ones as they are, the others from the nearest measured FLOP rate.

    Each shape's FLOPs count the head it will have (the vocabulary capped by its width, rule 4).
    """
    flops = {s.key: s.flops_per_token(capped_vocab(script, vocab, s.n_embd)) for s in shapes}
    rates = [(i, measured[s.key] * flops[s.key]) for i, s in enumerate(shapes) if s.key in measured]
    if not rates:
        raise ValueError("no probe measurement")
    out = {}
    for i, s in enumerate(shapes):
        if s.key in measured:
            out[s.key] = measured[s.key]
        else:
            rate = min(rates, key=lambda r: abs(r[0] - i))[1]
            out[s.key] = rate / flops[s.key]
    return out


def choose_shape(inputs: PlanInputs, vocab: int, tokens_per_s: dict[str, float]) -> tuple[int, float]:
    """(ladder index, tokens trained) of the largest shape that meets TOKENS_PER_PARAM in the budget."""
    shapes, seconds = ladder(inputs.device), train_seconds(inputs)
    pick = 0
    for i, s in enumerate(shapes):
        if s.key in tokens_per_s and tokens_per_s[s.key] * seconds >= TOKENS_PER_PARAM * s.body_params():
            pick = i
    return pick, tokens_per_s[shapes[pick].key] * seconds


def make_plan(inputs: PlanInputs, tokens_per_s: dict[str, float], probe_note: str = "") -> dict[str, Any]:
    """The plan: {"values": {field: value}, "rows": [{"name", "value", "why"}], "inputs": {...}}."""
    vocab, vocab_why = vocab_for(inputs)
    shapes = ladder(inputs.device)
    idx, tokens = choose_shape(inputs, vocab, tokens_per_s)
    shape = shapes[idx]
    if capped_vocab(inputs.script, vocab, shape.n_embd) < vocab:
        vocab = capped_vocab(inputs.script, vocab, shape.n_embd)
        per_dim = TYPES_PER_DIM.get(inputs.script, DEFAULT_TYPES_PER_DIM)
        vocab_why = f"{vocab_why}; capped at {per_dim} per dimension of width {shape.n_embd}"
    # A context that the validation split (~10% of the corpus) can fill several times over.
    est_tokens = inputs.corpus_bytes / (1.0 if inputs.script == "cjk" else 2.5)
    block = shape.block_size
    while block > 16 and block * 8 > est_tokens * 0.1:
        block //= 2
    seconds = train_seconds(inputs)
    tps = tokens_per_s[shape.key]
    base_lr = BASE_LR.get(inputs.device, BASE_LR["cpu"])
    lr = round(base_lr * math.sqrt(128 / shape.n_embd), 5)
    epochs = tokens / max(est_tokens, 1.0)
    dropout = 0.1 if epochs > DROPOUT_EPOCHS else 0.0
    ratio = tokens / shape.body_params()
    budget = f"{inputs.budget_s:g} s budget" if inputs.budget_s else f"no --max-time: sized for {ASSUMED_BUDGET_S:g} s"
    shape_why = (f"{budget}, {probe_note or 'estimated'} {tps:,.0f} tok/s -> {tokens / 1e6:.2f}M tokens "
                 f"= {ratio:.1f} per parameter ({shape.body_params() / 1e6:.2f}M, target >= {TOKENS_PER_PARAM:g})")
    rows = [
        PlanRow("script", inputs.script, "character classes of a sample of the corpus"),
        PlanRow("tokenizer_vocab", vocab, vocab_why),
        PlanRow("n_layer", shape.n_layer, shape_why),
        PlanRow("n_embd", shape.n_embd, f"ladder step {idx + 1} of {len(shapes)} on {inputs.device}"),
        PlanRow("n_head", shape.n_head, f"head dim {shape.n_embd // shape.n_head}"),
        PlanRow("block_size", block, "the shape's context" if block == shape.block_size
                else f"shortened to fit the small validation split (~{est_tokens * 0.1:,.0f} tokens)"),
        PlanRow("batch_size", shape.batch_size, f"{shape.batch_size * block:,} tokens per step"),
        PlanRow("lr", lr, f"{base_lr:g} x sqrt(128 / width) on {inputs.device}, warmup-stable-decay over the budget"),
        PlanRow("min_lr", round(lr / 10, 6), "lr / 10 at the end of the decay"),
        PlanRow("dropout", dropout, f"~{epochs:.1f} passes over the data in {seconds:.0f} s of training"),
        PlanRow("eval_batches", 8 if seconds < 500 else 20, "a short budget keeps its evaluations (the final one is "
                "inside the budget) short" if seconds < 500 else "the default"),
    ]
    values = {r.name: r.value for r in rows if r.name in PLANNED_FIELDS}
    return {"values": values, "rows": [asdict(r) for r in rows], "inputs": asdict(inputs),
            "tokens_per_s": tokens_per_s}


def apply_overrides(plan: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The plan with every value the user gave explicitly (a flag, a config file) in place of the planned one."""
    values, rows = dict(plan["values"]), []
    for row in plan["rows"]:
        name = row["name"]
        if name in given and name in PLANNED_FIELDS:
            values[name] = given[name]
            row = {**row, "value": given[name], "why": f"given (--{name.replace('_', '-')}); planned {row['value']}"}
        rows.append(row)
    n_head, n_embd = values["n_head"], values["n_embd"]
    if n_embd % n_head or (n_embd // n_head) % 2:  # keep heads valid when only the width was given
        n_head = next((h for h in range(max(1, n_embd // 32), 0, -1) if n_embd % h == 0 and (n_embd // h) % 2 == 0),
                      n_head)
        if "n_head" not in given:
            values["n_head"] = n_head
            rows = [{**r, "value": n_head, "why": f"head dim {n_embd // n_head} for the given width"}
                    if r["name"] == "n_head" else r for r in rows]
    if values["min_lr"] > values["lr"]:
        values["min_lr"] = values["lr"] if "min_lr" not in given else values["min_lr"]
    return {**plan, "values": values, "rows": rows}
