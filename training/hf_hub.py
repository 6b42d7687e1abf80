"""`import-hf ORG/NAME[@REVISION]`: fetch a model folder from the Hugging Face Hub into its cache.

Only what the import reads is downloaded: JSON (configs, tokenizer.json, tokenizer_config.json, the shard
index), safetensors weights and GPT-2's merges.txt. Pickle weights (`*.bin`, `*.pt`) never are: loading a
pickle can run code hidden in it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pocketgpt.training.errors import UserError

ALLOW_PATTERNS = ["*.json", "*.safetensors", "merges.txt"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def looks_like_hub_id(source: str) -> bool:
    """True for ORG/NAME or ORG/NAME@REVISION (a local directory of that name is checked for first)."""
    return HUB_ID.fullmatch(source) is not None


def download(source: str) -> Path:
    """The local snapshot folder of `source` (ORG/NAME[@REVISION]); a UserError explains a failed download."""
    repo, _, revision = source.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{source!r} is not a local directory, and downloading it needs huggingface_hub "
                        "(pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision or None, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model, HTTP errors: all end the same way
        by_hand = (f"huggingface-cli download {repo}{f' --revision {revision}' if revision else ''} "
                   f"--include '*.json' '*.safetensors' --local-dir DIR")
        raise UserError(
            f"cannot download {source!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without network "
            f"access, download it on a connected machine with `{by_hand}`, copy DIR here and run "
            "`pocketgpt import-hf DIR --out CHECKPOINT`"
        ) from None
