"""`python -m pocketgpt.training export CHECKPOINT --format hf|gguf --out PATH`: hand a checkpoint to the big
serving engines.

    --format hf     a Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM) that
                    transformers, vLLM and TGI load, and llama.cpp's convert_hf_to_gguf.py converts
    --format gguf   one GGUF file for llama.cpp and Ollama (modern layout; --outtype f32, f16 or q8_0;
                    needs `pip install gguf`, the `gguf` extra)

See the README section "When you outgrow this server" for the commands that serve the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pocketgpt.training.errors import UserError


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory to export")
    p.add_argument("--format", required=True, choices=["hf", "gguf"], help="hf: a transformers folder; gguf: a file")
    p.add_argument("--out", required=True, metavar="PATH", help="folder (hf) or .gguf file (gguf) to write")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="GGUF tensor type (gguf only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def export(checkpoint: str | Path, fmt: str, out: str | Path, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Export `checkpoint` as `fmt` ("hf" or "gguf") to `out`; returns what was written."""
    import shutil

    from pocketgpt.model.checkpoint import CheckpointError, load_checkpoint

    target = Path(out)
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists: choose another --out or pass --overwrite")
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if fmt == "hf":
        from pocketgpt.training.export_hf import export_hf

        return export_hf(ckpt, target)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("--format gguf needs the gguf package: pip install 'pocketgpt[gguf]' (or pip install gguf)"
                        ) from None
    from pocketgpt.training.export_gguf import export_gguf

    return export_gguf(ckpt, target, outtype)


def cmd_export(ns: argparse.Namespace) -> int:
    path = export(ns.checkpoint, ns.format, ns.out, ns.outtype, ns.overwrite)
    print(f"wrote {path}", file=sys.stdout)
    return 0
