"""`python -m pocketgpt.training import-hf DIR|ORG/NAME[@REV] --out CHECKPOINT`: a Hugging Face model -> a checkpoint.

Architectures: LlamaForCausalLM (Llama 2/3, SmolLM2, TinyLlama), Qwen2ForCausalLM, MistralForCausalLM (its
context capped at the sliding window, within which it computes the same) and GPT2LMHeadModel. DIR is a model
folder on disk as `save_pretrained` writes it; ORG/NAME downloads one from the Hub into its cache (JSON and
safetensors files only):

    config.json                              `architectures` names one of the above
    model.safetensors                        or sharded: model.safetensors.index.json + its shards
    tokenizer.json (GPT-2: or vocab.json + merges.txt), tokenizer_config.json, generation_config.json

Weights keep their stored dtype (`--dtype auto`) or are cast (`--dtype float32|bfloat16|float16`). The
context is capped at `--max-context` tokens (default 8192), since the server's KV cache is sized by it.

A folder with only `pytorch_model.bin` (pickle) is refused: unpickling can run code hidden in the file.
`--allow-pickle` loads it anyway with torch.load(weights_only=True), which only rebuilds tensors and plain
containers; prefer converting such a model to safetensors.

The checkpoint then serves (`pocketgpt serve --checkpoint CHECKPOINT`) and fine-tunes
(`pocketgpt train --task sft --init-from CHECKPOINT --data pairs.jsonl`) like any other.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pocketgpt.training.errors import UserError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HFFiles:
    """The files of a model folder that the import reads."""

    config: Path
    weights: list[Path]
    pickle: bool
    tokenizer_json: Path | None
    vocab_merges: tuple[Path, Path] | None


def _weight_files(root: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    if (root / SAFETENSORS).is_file():
        return [root / SAFETENSORS], False
    if (root / SAFETENSORS_INDEX).is_file():
        from pocketgpt.training.hf_convert import read_json

        weight_map = read_json(root / SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{root / SAFETENSORS_INDEX} has no weight_map")
        shards = [root / name for name in sorted(set(weight_map.values()))]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise UserError(f"missing weight shard(s) named by {SAFETENSORS_INDEX}: {', '.join(absent)}")
        return shards, False
    if (root / PICKLE).is_file():
        if not allow_pickle:
            raise UserError(
                f"{root} has only pickle weights ({PICKLE}), and loading a pickle can run arbitrary code hidden "
                f"in the file, so it is refused. Convert the model to {SAFETENSORS} (transformers: "
                "save_pretrained(dir, safe_serialization=True)), or, if you trust its origin, pass "
                "--allow-pickle to load it with torch.load(weights_only=True), which only accepts tensors"
            )
        return [root / PICKLE], True
    raise UserError(f"{root} has no weights: expected {SAFETENSORS} (or {SAFETENSORS_INDEX} and its shards)")


def find_files(root: Path, allow_pickle: bool = False) -> HFFiles:
    """Locate config, weights and tokenizer in `root`; a UserError names whatever is missing or refused."""
    if not root.is_dir():
        raise UserError(f"model directory not found: {root}")
    if not (root / "config.json").is_file():
        raise UserError(f"{root} has no config.json: not a Hugging Face model directory")
    weights, pickle = _weight_files(root, allow_pickle)
    tokenizer_json = root / "tokenizer.json" if (root / "tokenizer.json").is_file() else None
    vocab, merges = root / "vocab.json", root / "merges.txt"
    vocab_merges = (vocab, merges) if vocab.is_file() and merges.is_file() else None
    if tokenizer_json is None and vocab_merges is None:
        raise UserError(f"{root} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt")
    return HFFiles(root / "config.json", weights, pickle, tokenizer_json, vocab_merges)


def resolve_source(src: str | Path) -> Path:
    """A local model folder, or the Hub snapshot of ORG/NAME[@REVISION] when no such folder exists."""
    from pocketgpt.training import hf_hub

    root = Path(src)
    if root.is_dir() or not hf_hub.looks_like_hub_id(str(src)):
        return root
    return hf_hub.download(str(src))


def import_hf(src: str | Path, out: str | Path, allow_pickle: bool = False, overwrite: bool = False,
              dtype: str = "auto", max_context: int | None = None) -> Path:
    """Convert the Hugging Face model `src` (a folder or ORG/NAME[@REV]) into a checkpoint `out`; returns its path."""
    import torch

    from pocketgpt.model.checkpoint import save_checkpoint
    from pocketgpt.model.gpt import GPT
    from pocketgpt.training.hf_convert import gpt2_state_dict, gpt2_tokenizer, llama_state_dict, read_json, read_weights
    from pocketgpt.training.hf_families import DEFAULT_MAX_CONTEXT, family_for
    from pocketgpt.training.hf_tokenizer import import_chat_template, import_tokenizer

    target = Path(out)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists: choose another --out or pass --overwrite")
    root = resolve_source(src)
    files = find_files(root, allow_pickle)
    hf_config = read_json(files.config)
    family = family_for(hf_config, str(files.config))
    config = family.model_config(hf_config, str(files.config), max_context or DEFAULT_MAX_CONTEXT)
    if files.tokenizer_json is not None and family.layout == "llama":
        tokenizer = import_tokenizer(root, hf_config)
    else:
        tokenizer = gpt2_tokenizer(files.tokenizer_json, files.vocab_merges)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.json vocab_size is "
                        f"{config.vocab_size}")
    tensors = read_weights(files.weights, files.pickle)
    stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    model = GPT(config).to(stored if dtype == "auto" else getattr(torch, dtype))
    convert = llama_state_dict if family.layout == "llama" else gpt2_state_dict
    model.load_state_dict(convert(tensors, model))
    meta = {
        "kind": "import", "step": 0, "tokens_seen": 0,
        "source": {
            "format": f"huggingface-{family.layout}", "architecture": (hf_config.get("architectures") or ["?"])[0],
            "path": str(root.resolve()), "origin": str(src), "weights": [f.name for f in files.weights],
            "tokenizer": "tokenizer.json" if files.tokenizer_json else "vocab.json+merges.txt",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
    }
    template = import_chat_template(root) if files.tokenizer_json is not None else None
    if template is not None:
        try:
            template.check(tokenizer)
        except ValueError as e:
            print(f"warning: the model's chat template was not imported: {e}", file=sys.stderr)
            template = None
    return save_checkpoint(target, model, tokenizer, meta, chat_template=template)


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="DIR|ORG/NAME[@REV]",
                   help="a local Hugging Face model directory, or a Hub model id to download")
    p.add_argument("--out", required=True, metavar="CHECKPOINT", help="checkpoint directory to write")
    p.add_argument("--allow-pickle", action="store_true",
                   help=f"accept {PICKLE} (loaded with torch.load(weights_only=True)) when no safetensors exist")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights' dtype in the checkpoint (auto: as stored)")
    p.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="cap the context length (default 8192; the KV cache is sized by it)")


def cmd_import_hf(ns: argparse.Namespace) -> int:
    if ns.max_context is not None and ns.max_context < 1:
        raise UserError("--max-context must be at least 1")
    path = import_hf(ns.source, ns.out, allow_pickle=ns.allow_pickle, overwrite=ns.overwrite, dtype=ns.dtype,
                     max_context=ns.max_context)
    from pocketgpt.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)  # read back: proves the checkpoint is whole and loadable
    c = ckpt.config
    print(f"{path}: {ckpt.model.num_params():,} parameters ({c.n_layer} layers, {c.n_head} heads "
          f"({c.kv_heads} key/value), {c.n_embd} wide, "
          f"context {c.block_size}, vocab {c.vocab_size}; tokenizer {ckpt.tokenizer.vocab_size} tokens, "
          f"end-of-text id {ckpt.tokenizer.eot_id})", file=sys.stdout)
    return 0
