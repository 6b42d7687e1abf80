"""Training config and data preparation: sources, UTF-8 handling, token files, reuse, clear errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketgpt.model.config import PRESETS
from pocketgpt.model.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
from pocketgpt.training.cli import build_parser, normalize_argv, resolve_train_config
from pocketgpt.training.config import MIN_TOKENIZER_VOCAB, PresetName, TrainConfig, validate_config
from pocketgpt.training.data import load_prepared, prepare_data, token_dtype
from pocketgpt.training.errors import DataError, UserError
from pocketgpt.training.sources import stdlib_files, stdlib_root
from tests.conftest import CHINESE, ENGLISH

ROOT = Path(__file__).resolve().parents[1]


def structured_corpus(n: int = 6000, seed: int = 0) -> str:
    """Lines with a learnable structure: a bit of randomness in fixed slots, the rest predictable."""
    r = random.Random(seed)
    colors, animals = ["red", "blue", "green", "black"], ["cat", "dog", "fox", "owl"]
    foods = ["apples", "bread", "fish"]
    return "\n".join(
        f"The {r.choice(colors)} {r.choice(animals)} number {i % 50} likes {r.choice(foods)}." for i in range(n)
    )


def write_corpus(path: Path, n: int = 6000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(structured_corpus(n), encoding="utf-8")
    return path


def parse_train(argv: list[str]) -> TrainConfig:
    return resolve_train_config(build_parser().parse_args(normalize_argv(argv)))


def prep(specs: list[str], out: Path, vocab: int = 400, **kw):
    logs: list[str] = []
    data = prepare_data(specs, out, tokenizer_vocab=vocab, val_fraction=kw.pop("val_fraction", 0.1),
                        log=logs.append, **kw)
    return data, logs


# -- config -------------------------------------------------------------------------------------------
def test_config_imports_no_torch() -> None:
    code = "import sys, training.config, training.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_schema_matches_the_model_package() -> None:
    assert sorted(PresetName.__args__) == sorted(PRESETS)
    assert MIN_TOKENIZER_VOCAB == MIN_VOCAB_SIZE
    cfg = TrainConfig()
    assert cfg.data == ["stdlib"] and cfg.device == "auto" and cfg.prepared_dir == Path("runs/pocketgpt/data")
    with pytest.raises(UserError, match="bogus"):
        validate_config({"bogus": 1})
    with pytest.raises(UserError, match="min_lr"):
        validate_config({"lr": 1e-4, "min_lr": 1e-3})


def test_config_file_then_explicit_flags_win(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('preset = "tiny"\nbatch_size = 4\nlr = 0.005\ndata = ["a.txt"]\n')
    cfg = parse_train(["--config", str(toml), "--batch-size", "8", "--data", "x", "y", "--data", "z"])
    assert (cfg.preset, cfg.batch_size, cfg.lr, cfg.data) == ("tiny", 8, 0.005, ["x", "y", "z"])
    js = tmp_path / "job.json"
    js.write_text(json.dumps({"max_steps": 7, "compile": True}))
    cfg = parse_train(["train", "--config", str(js), "--no-compile"])
    assert cfg.max_steps == 7 and cfg.compile is False
    # to_argv is what a job manager runs; it must rebuild the same config.
    job = TrainConfig(data=["a", "b"], preset="tiny", max_time=60.0, compile=True)
    assert parse_train(job.to_argv()) == job


def test_bad_config_file_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text("preset = tiny\n")
    with pytest.raises(UserError, match="cannot be parsed"):
        parse_train(["--config", str(bad)])
    with pytest.raises(UserError, match="not found"):
        parse_train(["--config", str(tmp_path / "none.toml")])


# -- sources ------------------------------------------------------------------------------------------
def test_stdlib_sources_are_many_python_files_without_tests() -> None:
    files = stdlib_files()
    rel = [f.relative_to(stdlib_root()) for f in files]
    assert len(files) > 300 and all(f.suffix == ".py" for f in files)
    assert any(str(r) == "os.py" for r in rel)
    excluded = {"test", "tests", "idle_test", "site-packages"}
    assert not [r for r in rel if excluded.intersection(r.parts)]


def test_prepare_mixed_sources_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(ENGLISH * 20, encoding="utf-8")
    (src / "sub" / "b.md").write_text(CHINESE * 20, encoding="utf-8")
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    (src / "latin1.txt").write_bytes("café".encode("latin-1"))
    (src / ".hidden").write_text("not read")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["第一篇文章。", "second doc"]) + "\n")
    data, logs = prep([str(src), str(jsonl)], tmp_path / "prep", val_fraction=0.2)

    docs = [ENGLISH * 20, CHINESE * 20, "第一篇文章。", "second doc"]
    tokens = np.concatenate([data.train, data.val]).tolist()
    assert data.tokenizer.decode(tokens) == "".join(docs)
    assert tokens.count(data.tokenizer.eot_id) == len(docs) - 1  # EOT between documents
    assert data.train.dtype == np.uint16
    m = data.meta
    assert m["train_bytes"] + m["val_bytes"] == sum(len(d.encode()) for d in docs)
    assert m["val_tokens"] == round(len(tokens) * 0.2) and m["documents"] == 4
    assert sorted(Path(p).name for p in m["skipped_files"]) == ["image.png", "latin1.txt"]
    assert any("skipped 2 file(s)" in line for line in logs)


def test_prepare_reuses_until_an_input_changes(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt", 500)
    first, _ = prep([str(corpus)], tmp_path / "prep")
    again, logs = prep([str(corpus)], tmp_path / "prep")
    assert any("reusing" in line for line in logs) and again.meta == first.meta
    # The same data through the tokenizer it was made with (what a resumed run does) is reused too.
    _, logs = prep([str(corpus)], tmp_path / "prep", tokenizer=first.tokenizer)
    assert any("reusing" in line for line in logs)
    _, logs = prep([str(corpus)], tmp_path / "prep", val_fraction=0.2)
    assert not any("reusing" in line for line in logs)
    corpus.write_text(structured_corpus(500, seed=1))
    os.utime(corpus, ns=(1, 1))
    changed, logs = prep([str(corpus)], tmp_path / "prep")
    assert not any("reusing" in line for line in logs)
    assert changed.meta["fingerprint"] != first.meta["fingerprint"]
    assert load_prepared(tmp_path / "prep").meta == changed.meta


def test_given_tokenizer_is_used(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.txt", 300)
    tok = train_tokenizer([ENGLISH], vocab_size=300)
    data, _ = prep([str(corpus)], tmp_path / "prep", tokenizer=tok)
    assert data.tokenizer.to_str() == tok.to_str()
    assert tok.decode(np.concatenate([data.train, data.val]).tolist()) == structured_corpus(300)


def test_token_dtype_widens_for_big_vocabularies() -> None:
    assert token_dtype(8192) == np.uint16 and token_dtype(65535) == np.uint16 and token_dtype(70000) == np.uint32


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "data source not found"),
        ("empty.txt", b"", "corpus is empty"),
        ("blob.bin", b"\x00\x01\x02" * 100, "is not UTF-8 text \\(binary\\)"),
        ("l1.txt", "é".encode("latin-1") * 9, "invalid UTF-8 at byte 0"),
        ("bad.jsonl", b'{"text": "a"}\n{"txt": 1}\n', "bad.jsonl:2: expected an object"),
        ("*.nothing", None, "no files match"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        prep([str(tmp_path / name)], tmp_path / "prep")
    assert name in str(err.value)


def test_folder_of_only_binary_files_is_an_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"corpus is empty.*skipped 1 file\(s\).*a\.bin \(binary\)"):
        prep([str(tmp_path / "src")], tmp_path / "prep")


def test_context_longer_than_the_data_is_refused(tmp_path: Path) -> None:
    data, _ = prep([str(write_corpus(tmp_path / "c.txt", 40))], tmp_path / "prep")
    data.check_context(16)
    with pytest.raises(DataError, match=r"validation split has \d+ tokens.*block_size\+1 = 101"):
        data.check_context(100)
    with pytest.raises(DataError, match=r"training split has \d+ tokens.*block_size\+1 = 1025"):
        data.check_context(1024)
