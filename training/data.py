"""Prepare a corpus for training: BPE tokenizer, token memmaps and their meta.json.

    DIR/train.bin   tokens of the first (1 - val_fraction) of the corpus (uint16, or uint32 for vocab > 65535)
    DIR/val.bin     tokens of the rest
    DIR/tokenizer.json
    DIR/meta.json   token and byte counts per split (bytes give bits per byte), dtype, fingerprint, sources

Documents are joined with the EOT token between them. The tokenizer is trained on the first ~20 MB of the
corpus, or given (the tokenizer of a checkpoint we resume or start from). Preparing again with the same
sources (paths, sizes, mtimes), split and tokenizer reuses the files instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from pocketgpt.model.tokenizer import Tokenizer, train_tokenizer
from pocketgpt.training.errors import DataError
from pocketgpt.training.interrupt import off_main_thread
from pocketgpt.training.sources import ReadStats, SourceFile, expand_sources, iter_documents

FORMAT_VERSION = 1
TOKENIZER_SAMPLE_BYTES = 20_000_000  # BPE training time grows with the sample; 20 MB is plenty for merges
ENCODE_BATCH_CHARS = 4_000_000  # text handed to one encode_batch call
PIECE_CHARS = 1 << 16  # long documents are cut at line ends so encode_batch can spread them over threads
META, TRAIN, VAL, TOKENIZER = "meta.json", "train.bin", "val.bin", "tokenizer.json"
TOKENS_TMP, META_TMP = "tokens.tmp", "meta.json.tmp"

Log = Callable[[str], None]


@dataclass
class PreparedData:
    """Token memmaps of both splits, their tokenizer and meta.json."""

    path: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray

    def check_context(self, block_size: int) -> None:
        """Refuse a context that does not fit in a split: training windows are block_size + 1 tokens."""
        for name, split in (("training", self.train), ("validation", self.val)):
            if len(split) <= block_size + 1:
                raise DataError(
                    f"the {name} split has {len(split)} tokens, too few for one window of block_size+1 = "
                    f"{block_size + 1} tokens: add more text, lower --block-size, or change --val-fraction"
                )

    @property
    def val_bytes_per_token(self) -> float:
        return self.meta["val_bytes"] / self.meta["val_tokens"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint32 if vocab_size > 65535 else np.uint16)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 byte length of each token id (0 for special tokens): sums of it give exact byte counts."""
    return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)


def sources_fingerprint(files: list[SourceFile]) -> str:
    rows = []
    for f in files:
        st = f.path.stat()
        rows.append([str(f.path.resolve()), st.st_size, st.st_mtime_ns, f.jsonl])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _fingerprint(sources_fp: str, tokenizer_sha: str, val_fraction: float) -> str:
    key = json.dumps([FORMAT_VERSION, sources_fp, tokenizer_sha, val_fraction])
    return hashlib.sha256(key.encode()).hexdigest()


def load_prepared(path: str | Path) -> PreparedData:
    """Open prepared data; a DataError says if it is missing or damaged."""
    root = Path(path)
    try:
        meta = json.loads((root / META).read_text())
        tokenizer = Tokenizer.from_file(root / TOKENIZER)
    except (OSError, ValueError) as e:
        raise DataError(f"no usable prepared data in {root} ({e}); run `prepare` again") from None
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for name, key in ((TRAIN, "train_tokens"), (VAL, "val_tokens")):
        file = root / name
        if not file.is_file() or file.stat().st_size != meta[key] * dtype.itemsize:
            raise DataError(f"prepared data file {file} is missing or has the wrong size; delete {root} and retry")
        splits[name] = np.memmap(file, dtype=dtype, mode="r", shape=(meta[key],))
    return PreparedData(root, meta, tokenizer, splits[TRAIN], splits[VAL])


def _reusable(root: Path, sources_fp: str, val_fraction: float, request: dict[str, Any]) -> PreparedData | None:
    """The prepared data in `root` if it was made from the same sources, split and tokenizer."""
    try:
        meta = json.loads((root / META).read_text())
    except (OSError, ValueError):
        return None
    same = (
        meta.get("format_version") == FORMAT_VERSION
        and meta.get("sources_fingerprint") == sources_fp
        and meta.get("val_fraction") == val_fraction
        and (meta.get("tokenizer_sha256") == request.get("sha256") or meta.get("tokenizer_request") == request)
    )
    if not same:
        return None
    try:
        return load_prepared(root)
    except DataError:
        return None


def _sample_for_tokenizer(files: list[SourceFile], budget: int, stats: ReadStats) -> list[str]:
    sample, size = [], 0
    for doc in iter_documents(files, stats):
        sample.append(doc[: budget - size])
        size += len(sample[-1])
        if size >= budget:
            break
    return sample


def _pieces(docs: Iterator[str]) -> Iterator[tuple[bool, str]]:
    """(starts_a_document, text) pieces of at most ~PIECE_CHARS, cut after a newline where possible."""
    for doc in docs:
        start, first = 0, True
        while start < len(doc):
            end = min(start + PIECE_CHARS, len(doc))
            if end < len(doc):
                cut = doc.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            yield first, doc[start:end]
            start, first = end, False


def _write_tokens(docs: Iterator[str], tokenizer: Tokenizer, fh: Any, dtype: np.dtype) -> int:
    """Tokenize `docs` in batches into the open binary file `fh`, EOT between documents; returns the count."""
    pieces = _pieces(docs)
    count = 0
    while batch := list(islice(pieces, 1 << 12)):
        while sum(len(t) for _, t in batch) < ENCODE_BATCH_CHARS and (more := list(islice(pieces, 1 << 12))):
            batch += more
        encoded = off_main_thread(tokenizer.encode_batch, [t for _, t in batch])  # a signal can stop it
        for (starts_doc, _), ids in zip(batch, encoded, strict=True):
            if starts_doc and count:
                ids = [tokenizer.eot_id, *ids]
            np.asarray(ids, dtype=dtype).tofile(fh)
            count += len(ids)
    return count


def _count_bytes(tokens: np.ndarray, lengths: np.ndarray, chunk: int = 1 << 24) -> int:
    return int(sum(lengths[np.asarray(tokens[i : i + chunk])].sum() for i in range(0, len(tokens), chunk)))


def prepare_data(
    specs: list[str],
    out_dir: str | Path,
    *,
    tokenizer_vocab: int,
    val_fraction: float,
    tokenizer: Tokenizer | None = None,
    log: Log = print,
) -> PreparedData:
    """Prepare (or reuse) the token files for `specs` in `out_dir`; see the module docstring."""
    root = Path(out_dir)
    files = expand_sources(specs)
    sources_fp = sources_fingerprint(files)
    request = (
        {"sha256": tokenizer_sha256(tokenizer)} if tokenizer
        else {"trained_vocab": tokenizer_vocab, "sample_bytes": TOKENIZER_SAMPLE_BYTES}
    )
    if (reused := _reusable(root, sources_fp, val_fraction, request)) is not None:
        log(f"reusing prepared data in {root} ({reused.meta['train_tokens']:,} train tokens)")
        return reused

    root.mkdir(parents=True, exist_ok=True)
    (root / META).unlink(missing_ok=True)  # whatever was here is stale from now on
    try:
        return _prepare(root, files, specs, sources_fp, request, tokenizer, tokenizer_vocab, val_fraction, log)
    except BaseException:
        # Cut short (a signal, a full disk, bad data): meta.json was never written, so nothing here would be
        # trusted; remove the pieces anyway so no half-written file lingers.
        if not (root / META).exists():
            for name in (TOKENS_TMP, META_TMP, TRAIN, VAL, TOKENIZER):
                (root / name).unlink(missing_ok=True)
        raise


def _prepare(root: Path, files: list[SourceFile], specs: list[str], sources_fp: str, request: dict[str, Any],
             tokenizer: Tokenizer | None, tokenizer_vocab: int, val_fraction: float, log: Log) -> PreparedData:
    """Train the tokenizer (unless given), tokenize, split, and write meta.json last."""
    if tokenizer is None:
        sample_stats = ReadStats()
        sample = _sample_for_tokenizer(files, TOKENIZER_SAMPLE_BYTES, sample_stats)
        if not sample:
            raise _empty_corpus(files, specs, sample_stats)
        log(f"training a {tokenizer_vocab}-token BPE tokenizer on {sum(map(len, sample)):,} characters")
        tokenizer = off_main_thread(train_tokenizer, sample, tokenizer_vocab)  # minutes on a large corpus
    dtype = token_dtype(tokenizer.vocab_size)
    stats = ReadStats()
    log(f"tokenizing {len(files)} file(s) into {root}")
    tmp = root / TOKENS_TMP
    with open(tmp, "wb") as fh:
        total = _write_tokens(iter_documents(files, stats), tokenizer, fh, dtype)
    if stats.skipped:
        log(f"warning: {stats.skipped_summary()}")
    if stats.documents == 0:
        tmp.unlink()
        raise _empty_corpus(files, specs, stats)

    n_val = max(1, round(total * val_fraction))
    n_train = total - n_val
    lengths = token_byte_lengths(tokenizer)
    tokens = np.memmap(tmp, dtype=dtype, mode="r", shape=(total,))
    np.asarray(tokens[n_train:]).tofile(root / VAL)
    # Bytes from the tokens themselves, so train + val bytes always match what the tokens decode to.
    train_bytes, val_bytes = _count_bytes(tokens[:n_train], lengths), _count_bytes(tokens[n_train:], lengths)
    del tokens  # unmap before truncating the file under it
    os.truncate(tmp, n_train * dtype.itemsize)
    os.replace(tmp, root / TRAIN)
    tokenizer.save(root / TOKENIZER)

    tok_sha = tokenizer_sha256(tokenizer)
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": _fingerprint(sources_fp, tok_sha, val_fraction),
        "sources_fingerprint": sources_fp,
        "tokenizer_sha256": tok_sha,
        "tokenizer_request": request,
        "sources": specs,
        "files": len(files),
        "skipped_files": stats.skipped,
        "documents": stats.documents,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "val_fraction": val_fraction,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
    }
    (root / META_TMP).write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(root / META_TMP, root / META)  # meta.json last: it marks the data complete
    log(f"prepared {n_train:,} train + {n_val:,} val tokens from {stats.documents:,} document(s), "
        f"{stats.bytes:,} bytes")
    return load_prepared(root)


def _empty_corpus(files: list[SourceFile], specs: list[str], stats: ReadStats) -> DataError:
    skipped = f"; {stats.skipped_summary()}" if stats.skipped else ""
    return DataError(f"the corpus is empty: {len(files)} file(s) from {', '.join(specs)} hold no text{skipped}")
