"""Dataset uploads (streamed, limited, hashed) and path safety of data sources and checkpoint names."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from pocketgpt.app.jobs.checkpoints import list_checkpoints, safetensors_params
from pocketgpt.app.jobs.datasets import (
    STDLIB,
    DataPathError,
    UploadInvalid,
    UploadTooLarge,
    resolve_checkpoint_name,
    resolve_data_source,
    save_upload,
)
from pocketgpt.app.jobs.store import JobStore

BOUNDARY = "xXxBoundaryxXx"


def multipart(content: bytes, field: str = "file", filename: str = "corpus.txt") -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: text/plain\r\n\r\n"
    ).encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


async def chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def upload(tmp_path: Path, body: bytes, limit: int = 10_000, send_length: bool = False):
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    if send_length:
        headers["content-length"] = str(len(body))
    store = JobStore(tmp_path / "db.sqlite")
    return store, asyncio.run(save_upload(headers, chunks(body), store, tmp_path / "data", limit))


def test_upload_is_streamed_to_disk_with_stats(tmp_path: Path) -> None:
    content = "line one\nline two\n第三行 no newline".encode()
    store, ds = upload(tmp_path, multipart(content, filename="../../etc/evil.TXT"))
    assert ds.id.startswith("ds-") and ds.path == f"datasets/{ds.id}.txt" and ds.filename == "evil.TXT"
    assert (ds.bytes, ds.lines, ds.sha256) == (len(content), 3, hashlib.sha256(content).hexdigest())
    assert (tmp_path / "data" / ds.path).read_bytes() == content
    assert store.get_dataset(ds.id) == ds
    assert [p.name for p in (tmp_path / "data" / "datasets").iterdir()] == [f"{ds.id}.txt"]  # no temp left


def test_upload_over_the_limit_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    body = multipart(b"x" * 5000)
    with pytest.raises(UploadTooLarge):
        upload(tmp_path, body, limit=4000)
    with pytest.raises(UploadTooLarge):  # refused from Content-Length alone, before reading
        upload(tmp_path, multipart(b"x" * 200_000), limit=4000, send_length=True)
    assert list((tmp_path / "data" / "datasets").iterdir()) == []
    _, ds = upload(tmp_path, multipart(b"x" * 4000), limit=4000)  # exactly at the limit is fine
    assert ds.bytes == 4000


@pytest.mark.parametrize(
    ("body", "ctype"),
    [(multipart(b"abc", field="other"), "multipart"), (multipart(b""), "multipart"), (b"{}", "json")],
)
def test_upload_without_a_usable_file_is_invalid(tmp_path: Path, body: bytes, ctype: str) -> None:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}" if ctype == "multipart"
               else "application/json"}
    store = JobStore(tmp_path / "db.sqlite")
    with pytest.raises(UploadInvalid):
        asyncio.run(save_upload(headers, chunks(body), store, tmp_path / "data", 10_000))


@pytest.mark.parametrize(("content", "why"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL byte at offset 8"),
    ("caf\u00e9".encode("latin-1") + b" au lait", "invalid UTF-8 near offset 3"),
    (b"ok " * 700 + b"\x00tail", "NUL byte at offset 2100"),  # past the first chunk
    ("\u5e8a".encode() * 10 + b"\xe5\xba", "ends inside a multi-byte character"),
], ids=["png", "latin-1", "late-nul", "cut-character"])
def test_binary_or_non_utf8_uploads_are_refused(tmp_path: Path, content: bytes, why: str) -> None:
    with pytest.raises(UploadInvalid) as info:
        upload(tmp_path, multipart(content))
    assert info.value.code == "not_text" and info.value.param == "file" and why in str(info.value)
    assert list((tmp_path / "data" / "datasets").iterdir()) == []


def test_characters_split_across_chunks_are_text(tmp_path: Path) -> None:
    content = "\u5e8a\u524d\u660e\u6708\u5149".encode() * 400  # 3-byte characters cut by the 1000-byte chunks
    _, ds = upload(tmp_path, multipart(content), limit=100_000)
    assert ds.bytes == len(content)


def test_a_multipart_body_without_its_closing_boundary_is_refused(tmp_path: Path) -> None:
    body = multipart(b"some text\n" * 50)
    for cut in (body[: body.rindex(b"\r\n--")], body[:-200]):
        with pytest.raises(UploadInvalid) as info:
            upload(tmp_path, cut)
        assert info.value.code == "incomplete_multipart" and info.value.param is None
        assert "incomplete" in str(info.value) and f"--{BOUNDARY}--" in str(info.value)
    assert list((tmp_path / "data" / "datasets").iterdir()) == []


def test_data_sources_must_stay_inside_the_data_root(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_text("hello")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, data / "link.txt")
    os.symlink(tmp_path, data / "linkdir")
    os.symlink(data / "sub" / "a.txt", data / "inner-link.txt")
    store = JobStore(tmp_path / "db.sqlite")
    assert resolve_data_source(STDLIB, store, data) == STDLIB
    assert resolve_data_source("sub/a.txt", store, data) == str((data / "sub" / "a.txt").resolve())
    assert resolve_data_source(str(data / "sub" / "a.txt"), store, data)  # absolute but inside
    assert resolve_data_source("inner-link.txt", store, data)  # a symlink that stays inside is fine
    for bad in ["../secret.txt", "sub/../../secret.txt", str(outside), "/etc/passwd", "link.txt",
                "linkdir/secret.txt", "", "a\0b", "sub/*.txt", "../*"]:
        with pytest.raises(DataPathError) as e:
            resolve_data_source(bad, store, data)
        assert not e.value.missing, bad
    for missing in ["nope.txt", "ds-000000000000"]:
        with pytest.raises(DataPathError) as e:
            resolve_data_source(missing, store, data)
        assert e.value.missing


def _fake_checkpoint(path: Path, step: int, shapes: dict[str, list[int]]) -> None:
    path.mkdir(parents=True)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         **{k: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}})
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    (path / "config.json").write_text(json.dumps({"n_layer": 2, "block_size": 64}))
    (path / "meta.json").write_text(json.dumps({"step": step, "val_loss": 1.25, "created": 1000.0 + step}))


def test_checkpoints_are_listed_recursively_with_params(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _fake_checkpoint(root / "job-aaa" / "best", 10, {"a": [4, 8], "b": [8]})
    _fake_checkpoint(root / "imported" / "gpt2" / "v1", 5, {"a": [2, 2]})
    _fake_checkpoint(root / "job-aaa" / ".best.old", 1, {"a": [1]})  # a crashed save's leftovers: skipped
    os.symlink(tmp_path / "elsewhere", root / "escape")
    _fake_checkpoint(tmp_path / "elsewhere" / "x", 7, {"a": [1]})  # only reachable through a symlink: skipped
    items = list_checkpoints(root, job_ids={"job-aaa"})
    assert [c["name"] for c in items] == ["job-aaa/best", "imported/gpt2/v1"]
    best = items[0]
    assert (best["step"], best["val_loss"], best["params"], best["job"]) == (10, 1.25, 40, "job-aaa")
    assert best["config"]["block_size"] == 64 and best["size_bytes"] > 0 and best["created"] == 1010.0
    assert items[1]["job"] is None
    assert safetensors_params(root / "missing.safetensors") is None


def test_checkpoint_names_are_confined_to_the_root(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    os.symlink(tiny_checkpoint, root / "outside-link")
    (root / "empty").mkdir()
    with pytest.raises(DataPathError):
        resolve_checkpoint_name("outside-link", root)
    with pytest.raises(DataPathError):
        resolve_checkpoint_name(str(tiny_checkpoint), root)
    with pytest.raises(DataPathError, match=r"no config\.json"):
        resolve_checkpoint_name("empty", root)
    shutil.copytree(tiny_checkpoint, root / "runs" / "tiny")
    assert resolve_checkpoint_name("runs/tiny", root) == (root / "runs" / "tiny").resolve()


def test_check_links_refuses_links_that_leave_the_root(tmp_path: Path) -> None:
    from pocketgpt.app.jobs.datasets import check_links

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ok" / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "ok" / "a.txt").write_text("a")
    (root / "ok" / "sub" / "b.txt").write_text("b")
    os.symlink(root / "ok" / "a.txt", root / "ok" / "sub" / "again.txt")  # stays inside: fine
    check_links(root / "ok", root, "folder")
    cases = {
        "file": lambda d: os.symlink(outside, d / "x.txt"),
        "folder": lambda d: os.symlink(outside, d / "linked-dir"),  # listed though not entered
        "dangling": lambda d: os.symlink(root / "gone", d / "x.txt"),
        "loop": lambda d: (os.symlink(d / "l2", d / "l1"), os.symlink(d / "l1", d / "l2")),
    }
    for name, plant in cases.items():
        folder = root / name / "deep"
        folder.mkdir(parents=True)
        plant(folder)
        with pytest.raises(DataPathError, match="symbolic link"):
            check_links(root / name, root, name)
