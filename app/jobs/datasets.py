"""Datasets: streaming multipart uploads to disk under a size limit, and safe resolution of a job's `data`.

An upload is parsed as it arrives (python-multipart's push parser) and written straight to a temp file next to
its final place, so memory stays flat and an oversized upload is refused after at most `limit` bytes of it were
read. The file must be UTF-8 text (no NUL bytes; checked as it streams) and the multipart body must end with its
closing boundary (a cut-off body is not a dataset). The stored file is `DATA_DIR/datasets/<id>.<ext>`; the
original filename is kept only as a label.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from python_multipart.exceptions import ParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pocketgpt.app.jobs.store import Dataset, JobStore

DATASETS_SUBDIR = "datasets"
STDLIB = "stdlib"  # the trainer's built-in corpus (Python's standard library sources)
DATASET_ID = re.compile(r"^ds-[0-9a-f]{12}$")
_EXT = re.compile(r"^[a-z0-9]{1,10}$")


class UploadTooLarge(Exception):
    """The upload exceeds the limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes (POCKETGPT_MAX_UPLOAD_BYTES)")
        self.limit = limit


class UploadInvalid(Exception):
    """The request is not a usable multipart upload with a `file` field (HTTP 400/422)."""

    def __init__(self, message: str, param: str | None = "file", code: str = "invalid_upload") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _not_text(why: str) -> UploadInvalid:
    return UploadInvalid(f"the file is not UTF-8 text ({why}); upload a UTF-8 text or JSONL corpus",
                         code="not_text")


class DataPathError(ValueError):
    """A `data` source or checkpoint name that is not allowed or does not exist; the message says why."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing  # True: a well-formed name of something that is not there


def new_dataset_id() -> str:
    return f"ds-{secrets.token_hex(6)}"


def _extension(filename: str) -> str:
    ext = Path(filename).suffix.lower().lstrip(".")
    return ext if _EXT.match(ext) else "txt"


class _FilePart:
    """Receives the bytes of the `file` part: writes them, counts them, hashes them, counts lines."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit
        self.fh = open(path, "wb")  # noqa: SIM115 (closed in finish/abort)
        self.size = self.newlines = 0
        self.last_byte = b""
        self.sha = hashlib.sha256()
        self.utf8 = codecs.getincrementaldecoder("utf-8")("strict")  # a character may span two chunks

    def write(self, data: bytes) -> None:
        offset = self.size
        self.size += len(data)
        if self.size > self.limit:
            raise UploadTooLarge(self.limit)
        nul = data.find(b"\0")
        if nul >= 0:
            raise _not_text(f"a NUL byte at offset {offset + nul}: binary data")
        try:
            self.utf8.decode(data)
        except UnicodeDecodeError as e:
            raise _not_text(f"invalid UTF-8 near offset {max(0, offset + e.start)}") from None
        self.fh.write(data)
        self.sha.update(data)
        self.newlines += data.count(b"\n")
        self.last_byte = data[-1:]

    @property
    def lines(self) -> int:
        return self.newlines + (1 if self.size and self.last_byte != b"\n" else 0)

    def finish(self) -> None:
        try:
            self.utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _not_text("it ends inside a multi-byte character") from None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


class _UploadParser:
    """Callback target for MultipartParser: routes the part named `field` to a _FilePart, ignores others."""

    def __init__(self, field: str, make_part) -> None:
        self.field, self.make_part = field, make_part
        self.part: _FilePart | None = None
        self.filename: str | None = None
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._current: _FilePart | None = None
        self._pending: list[bytes] = []
        self.ended = False  # the closing boundary was read

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data,
            "on_header_field": self._header_field, "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_end": self._part_end, "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._current = b"", None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name", b"").decode("utf-8", "replace") != self.field or self.part is not None:
            return
        self.filename = options.get(b"filename", b"upload.txt").decode("utf-8", "replace") or "upload.txt"
        self.part = self._current = self.make_part(self.filename)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.write(data[start:end])

    def _part_end(self) -> None:
        self._current = None

    def _end(self) -> None:
        self.ended = True


async def save_upload(
    headers: dict[str, str], body: AsyncIterator[bytes], store: JobStore, data_dir: Path, limit: int,
    field: str = "file",
) -> Dataset:
    """Stream a multipart body's `field` file to `data_dir/datasets/<id>.<ext>` and record it in the store."""
    content_type = headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadInvalid("send the dataset as multipart/form-data with a `file` field", param=None)
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
        raise UploadTooLarge(limit)  # refuse before reading; 64 KiB leaves room for the multipart framing
    target_dir = data_dir / DATASETS_SUBDIR
    target_dir.mkdir(parents=True, exist_ok=True)
    dataset_id = new_dataset_id()
    tmp = target_dir / f".{dataset_id}.part"
    target: dict[str, Path] = {}

    def make_part(filename: str) -> _FilePart:
        target["path"] = target_dir / f"{dataset_id}.{_extension(filename)}"
        return _FilePart(tmp, limit)

    handler = _UploadParser(field, make_part)
    parser = MultipartParser(params[b"boundary"], handler.callbacks())
    try:
        async for chunk in body:
            # Parsing and writing a chunk is quick (page cache); a thread keeps a slow disk off the event loop.
            await asyncio.to_thread(parser.write, chunk)
        parser.finalize()
        if not handler.ended:  # python-multipart's finalize() does not check this itself
            raise UploadInvalid("the multipart body is incomplete: it ends before its closing boundary "
                                f"(--{params[b'boundary'].decode('latin-1')[:70]}--)", param=None,
                                code="incomplete_multipart")
        if handler.part is None:
            raise UploadInvalid(f"the multipart body has no `{field}` file field")
        if handler.part.size == 0:
            raise UploadInvalid("the uploaded file is empty")
        handler.part.finish()
    except ParseError as e:  # garbage from the client is its error (400), not the server's
        if handler.part is not None:
            handler.part.abort()
        raise UploadInvalid(f"the multipart body is malformed: {e}", param=None) from None
    except BaseException:
        if handler.part is not None:
            handler.part.abort()
        raise
    os.replace(tmp, target["path"])
    ds = Dataset(
        id=dataset_id, filename=Path(handler.filename or "upload.txt").name[:255],
        path=target["path"].relative_to(data_dir).as_posix(), bytes=handler.part.size,
        lines=handler.part.lines, sha256=handler.part.sha.hexdigest(), created_at=time.time(),
    )
    return store.insert_dataset(ds)


def _inside(root: Path, name: str, what: str) -> Path:
    """`name` resolved (symlinks followed) inside `root`, refusing `..`, outside absolute paths and escapes."""
    if not name or "\0" in name:
        raise DataPathError(f"{what} must be a non-empty path")
    candidate = Path(name)
    if ".." in candidate.parts:
        raise DataPathError(f"{what} {name!r} may not contain '..'")
    root = root.resolve()
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise DataPathError(f"{what} {name!r} is outside {root} (after following symlinks)")
        if not resolved.exists():
            raise DataPathError(f"{what} {name!r} does not exist under {root}", missing=True)
    except OSError as e:  # e.g. a name too long for the filesystem: the client's mistake, not a server error
        raise DataPathError(f"{what} {name[:100]!r}... is not a usable path: {e.strerror}") from None
    return resolved


def check_links(path: Path, root: Path, what: str) -> None:
    """Refuse (DataPathError) a file or folder that holds a symlink whose target is outside `root`: the trainer
    and the checkpoint loader open what they find inside, so a link to /etc/passwd in a data folder, or a
    checkpoint whose model.safetensors links elsewhere, would be read although its name is inside the root.
    Links that stay inside the root are fine. Called when a job is submitted, again when it starts, and before a
    checkpoint is loaded."""
    root = root.resolve()
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):  # a linked folder is listed, not entered
            entries += [Path(dirpath, name) for name in (*dirnames, *filenames)]
    for entry in entries:
        if not entry.is_symlink():
            continue
        try:
            inside = entry.resolve(strict=True).is_relative_to(root)
        except (OSError, RuntimeError):  # dangling, or a loop
            inside = False
        if not inside:
            shown = entry.relative_to(root) if entry.is_relative_to(root) else entry
            raise DataPathError(f"{what} holds {str(shown)!r}, a symbolic link to a place outside {root}; "
                                "only files inside it are read")


def resolve_data_source(source: str, store: JobStore, data_dir: Path) -> str:
    """A job's `data` entry as the trainer argument: `stdlib`, or an absolute path inside the data root (refused
    when it is, or holds, a symlink leaving the root)."""
    if source == STDLIB:
        return STDLIB
    if DATASET_ID.match(source):
        ds = store.get_dataset(source)
        if ds is None:
            raise DataPathError(f"no dataset with id {source!r}", missing=True)
        path = _inside(data_dir, ds.path, "dataset")
    elif any(c in source for c in "*?["):
        # The trainer expands glob patterns; a pattern is not a path we can confine, so name files or folders.
        raise DataPathError(f"data path {source!r} may not contain glob characters (*, ?, [)")
    else:
        path = _inside(data_dir, source, "data path")
    check_links(path, data_dir, f"data path {source!r}")
    return str(path)


def resolve_checkpoint_name(name: str, checkpoint_dir: Path) -> Path:
    """A checkpoint named relative to the checkpoint root, as a directory inside it holding a config.json."""
    path = _inside(checkpoint_dir, name, "checkpoint")
    check_links(path, checkpoint_dir, f"checkpoint {name!r}")
    if not (path / "config.json").is_file():
        raise DataPathError(f"checkpoint {name!r} is not a checkpoint directory (no config.json)")
    return path
