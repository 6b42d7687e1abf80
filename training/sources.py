"""Corpus sources -> UTF-8 documents.

A source is a text file, a folder (every file below it, hidden entries skipped), a glob pattern (`**` allowed),
a `.jsonl` file whose lines are objects with a `text` field, or `stdlib`: the `*.py` sources of the running
interpreter's standard library (sysconfig's `stdlib` path; test suites and site-packages excluded; about
12 MB on CPython 3.11). A text file is one document; a JSONL line is one document.

A file the user named explicitly must be UTF-8 text or it is refused with its name. Files found in a folder
or by a glob that are binary or not UTF-8 are skipped and counted, so a folder with a stray image still works.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pocketgpt.training.config import STDLIB
from pocketgpt.training.errors import DataError

STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class SourceFile:
    path: Path
    jsonl: bool
    explicit: bool  # named by the user: refuse it if unreadable, rather than skip it


@dataclass
class ReadStats:
    """What reading the sources found; `skipped` maps a path to why it was left out."""

    documents: int = 0
    bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def skipped_summary(self, limit: int = 5) -> str:
        """One line naming the first few skipped files."""
        names = ", ".join(f"{p} ({why})" for p, why in list(self.skipped.items())[:limit])
        more = f" and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} file(s) that are not UTF-8 text: {names}{more}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's `*.py` files, without test suites and third-party packages."""
    root = stdlib_root()
    return sorted(
        p for p in root.rglob("*.py")
        if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(p.startswith(".") or p == "__pycache__" for p in parts)


def expand_sources(specs: list[str]) -> list[SourceFile]:
    """Resolve source specs into files, in a stable order; a missing path or an empty match is a DataError."""
    files: list[SourceFile] = []
    for spec in specs:
        if spec == STDLIB:
            found = stdlib_files()
            if not found:
                raise DataError(f"no standard library sources found under {stdlib_root()}")
            files += [SourceFile(p, jsonl=False, explicit=False) for p in found]
        elif any(c in spec for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"no files match the pattern {spec!r}")
            files += [SourceFile(p, _is_jsonl(p), explicit=False) for p in matches]
        else:
            p = Path(spec)
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and _visible(f, p))
                if not found:
                    raise DataError(f"folder {p} holds no files")
                files += [SourceFile(f, _is_jsonl(f), explicit=False) for f in found]
            elif p.is_file():
                files.append(SourceFile(p, _is_jsonl(p), explicit=True))
            else:
                raise DataError(f"data source not found: {spec}")
    return files


def _decode(source: SourceFile, stats: ReadStats) -> str | None:
    """The file's text, or None when it is skipped; raises DataError for an unreadable explicit file."""
    try:
        raw = source.path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {source.path}: {e.strerror}") from None
    reason = None
    if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
        reason = "binary"
    else:
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            reason = f"invalid UTF-8 at byte {e.start}"
    if source.explicit:
        raise DataError(f"{source.path} is not UTF-8 text ({reason}); convert it to UTF-8 or leave it out")
    stats.skipped[str(source.path)] = reason
    return None


def _jsonl_documents(path: Path, text: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
        yield record["text"]


def iter_documents(files: list[SourceFile], stats: ReadStats) -> Iterator[str]:
    """Yield each non-empty document of `files`, counting documents, bytes and skipped files in `stats`."""
    for source in files:
        text = _decode(source, stats)
        if text is None:
            continue
        docs = _jsonl_documents(source.path, text) if source.jsonl else iter([text])
        for doc in docs:
            if doc:
                stats.documents += 1
                stats.bytes += len(doc.encode("utf-8"))
                yield doc
