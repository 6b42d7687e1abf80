"""A Hugging Face model folder's tokenizer -> our Tokenizer, with the role tokens the model expects.

    tokenizer.json           the tokenizer (byte-level BPE, or SentencePiece-style with byte fallback)
    tokenizer_config.json    bos_token, eos_token, add_bos_token, chat_template
    generation_config.json   eos_token_id: one id or a list (every one ends a generation: "<|im_end|>", ...)
    config.json              bos_token_id / eos_token_id when the others do not say

GPT-2 folders without tokenizer.json (vocab.json + merges.txt) go through hf_convert.gpt2_tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from pocketgpt.model.chat_jinja import JinjaChatTemplate
from pocketgpt.model.tokenizer import EOT, Tokenizer, TokenizerSettings
from pocketgpt.training.errors import UserError
from pocketgpt.training.hf_convert import read_json

TOKENIZER_CONFIG, GENERATION_CONFIG = "tokenizer_config.json", "generation_config.json"


def _ids(value: Any) -> list[int]:
    """An `eos_token_id`-style value (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def read_tokenizer_config(root: Path) -> dict[str, Any]:
    """tokenizer_config.json of `root`, or {} when it has none."""
    path = root / TOKENIZER_CONFIG
    return read_json(path) if path.is_file() else {}


def _settings(hf: HFTokenizer, root: Path, model_config: dict[str, Any]) -> TokenizerSettings:
    tok_cfg = read_tokenizer_config(root)
    gen_path = root / GENERATION_CONFIG
    gen_cfg = read_json(gen_path) if gen_path.is_file() else {}

    def name(i: int) -> str:
        token = hf.id_to_token(i)
        if token is None:
            raise UserError(f"{root}: token id {i} (an end/begin token of the config) is not in the tokenizer")
        return token

    eos_ids = _ids(gen_cfg.get("eos_token_id")) or _ids(model_config.get("eos_token_id"))
    eos = _token(tok_cfg.get("eos_token")) or (name(eos_ids[0]) if eos_ids else None)
    if eos is None and hf.token_to_id(EOT) is not None:
        eos = EOT
    if eos is None:
        raise UserError(f"{root}: no end-of-text token: expected eos_token in {TOKENIZER_CONFIG} or eos_token_id "
                        f"in {GENERATION_CONFIG} or config.json")
    bos_ids = _ids(gen_cfg.get("bos_token_id")) or _ids(model_config.get("bos_token_id"))
    bos = _token(tok_cfg.get("bos_token")) or (name(bos_ids[0]) if bos_ids else None)
    if "add_bos_token" in tok_cfg:
        add_bos = bool(tok_cfg["add_bos_token"])
    else:  # the tokenizer's own post-processor says (Llama 3 puts <|begin_of_text|> there)
        add_bos = bos is not None and hf.encode("a", add_special_tokens=True).ids[:1] == [hf.token_to_id(bos)]
    stops = [name(i) for i in eos_ids if name(i) != eos]
    return TokenizerSettings(eos_token=eos, bos_token=bos, add_bos=add_bos and bos is not None,
                             stop_tokens=tuple(stops))


def import_tokenizer(root: Path, model_config: dict[str, Any]) -> Tokenizer:
    """Our Tokenizer from `root`'s tokenizer.json and the settings files beside it; UserError says what fails."""
    path = root / "tokenizer.json"
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise UserError(f"cannot read the tokenizer {path}: {e}") from None
    settings = _settings(hf, root, model_config)
    try:
        return Tokenizer(hf, settings)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def import_chat_template(root: Path) -> JinjaChatTemplate | None:
    """The model's own chat template (tokenizer_config.json `chat_template`, a string or a list of named ones,
    of which "default" is used), or None when it has none or it does not render (said on stderr)."""
    template = read_tokenizer_config(root).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template:
        return None
    try:
        return JinjaChatTemplate(template)
    except ValueError as e:
        print(f"warning: {root / TOKENIZER_CONFIG}: chat_template not imported: {e}", file=sys.stderr)
        return None
