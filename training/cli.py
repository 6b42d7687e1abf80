"""Train, prepare data for, and evaluate a pocketgpt model.

usage:
  python -m pocketgpt.training train --data PATH_OR_stdlib --preset tiny --max-steps N --out RUN_DIR
  python -m pocketgpt.training train --resume RUN_DIR [--max-steps N]        continue RUN_DIR/last exactly
  python -m pocketgpt.training train --init-from CHECKPOINT_DIR --data new.txt --out RUN_DIR
  python -m pocketgpt.training prepare --data PATH... --out RUN_DIR          tokenize only (RUN_DIR/data)
  python -m pocketgpt.training train --task sft --init-from CHECKPOINT_DIR --data pairs.jsonl --out RUN_DIR
  python -m pocketgpt.training eval --checkpoint DIR --data PATH [--prompts FILE] [--sft FILE] [--json]
  python -m pocketgpt.training import-hf HF_MODEL_DIR|ORG/NAME --out CHECKPOINT_DIR  a Hugging Face model
  python -m pocketgpt.training export CHECKPOINT_DIR --format hf|gguf --out PATH  for vLLM/TGI/llama.cpp/Ollama
  torchrun --nproc_per_node=N -m pocketgpt.training train ...                several processes (DDP)
`pocketgpt train|prepare|eval|import-hf|export ...` runs the same. Without a subcommand, `train` is meant.

--data takes files, folders, glob patterns, .jsonl files (a "text" field per line) and `stdlib`, the
default: the running Python's standard library sources (*.py, tests excluded, ~12 MB on CPython 3.11).
With --task sft, --data is JSONL of {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}
examples (see training.sft_data), and --init-from names the checkpoint to fine-tune.
--config FILE reads settings from TOML or JSON; flags given on the command line win over it.

exit codes: 0 finished, 1 unexpected error, 2 bad input (the message names it), 130 / 143 cancelled by
SIGINT / SIGTERM after saving RUN_DIR/last (or at once while preparing the data: nothing saved, nothing
half-written kept).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pocketgpt.training.config import TrainConfig, load_config_file, validate_config
from pocketgpt.training.errors import DistributedError, UserError
from pocketgpt.training.interrupt import Interrupted

COMMANDS = ("train", "prepare", "eval", "import-hf", "export")
PREPARE_FIELDS = ("data", "out", "data_dir", "val_fraction", "tokenizer_vocab", "init_from")
METAVARS = {
    "out": "RUN_DIR", "resume": "RUN_DIR", "init_from": "CHECKPOINT_DIR", "data_dir": "DIR", "max_time": "SECONDS",
}


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type or list/bool, choices) for a config field's annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return list, None
    return annotation, None


def _add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """One flag per config field; unset flags stay absent so that they do not override a config file."""
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (flags win over it)")
    for name in names:
        info = TrainConfig.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kind, choices = _flag_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        helptext = info.description + (f" (default: {default})" if default is not None else "")
        common = {"default": argparse.SUPPRESS, "help": helptext, "dest": name}
        if kind is list:
            parser.add_argument(flag, nargs="+", action="extend", metavar="SOURCE", **common)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            metavar = None if choices else METAVARS.get(name, name.upper())
            parser.add_argument(flag, type=kind, choices=choices, metavar=metavar, **common)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pocketgpt.training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,prepare,eval,import-hf,export}")
    train = sub.add_parser("train", help="train a model (the default)", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_flags(train, tuple(TrainConfig.model_fields))
    train.set_defaults(func=cmd_train)
    prepare = sub.add_parser("prepare", help="train the tokenizer and tokenize the data only")
    _add_config_flags(prepare, PREPARE_FIELDS)
    prepare.set_defaults(func=cmd_prepare)
    from pocketgpt.training.evaluate import add_eval_arguments, cmd_eval  # light: heavy imports are inside cmd_eval

    evaluate = sub.add_parser("eval", help="loss, perplexity, bits per byte, BLEU and ROUGE of a checkpoint")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    from pocketgpt.training import import_hf  # light, like training.evaluate: heavy imports are inside its command

    convert = sub.add_parser("import-hf", help="convert a Hugging Face Llama/Qwen2/Mistral/GPT-2 model to a checkpoint",
                             description=import_hf.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import_hf.add_import_arguments(convert)
    convert.set_defaults(func=import_hf.cmd_import_hf)
    from pocketgpt.training import export

    out = sub.add_parser("export", help="export a checkpoint for transformers/vLLM/TGI (hf) or llama.cpp/Ollama (gguf)",
                         description=export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_export_arguments(out)
    out.set_defaults(func=export.cmd_export)
    return parser


def resolve_train_config(ns: argparse.Namespace) -> TrainConfig:
    """Defaults < saved config of the resumed run < --config file < flags given explicitly."""
    explicit = {k: v for k, v in vars(ns).items() if k in TrainConfig.model_fields}
    values: dict[str, Any] = {}
    if explicit.get("resume"):
        run = Path(explicit["resume"])
        if "out" in explicit and Path(explicit["out"]) != run:
            raise UserError(f"--out {explicit['out']} differs from --resume {run}; a resumed run stays in its dir")
        values.update(_saved_config(run), out=str(run), init_from=None, overwrite=False)
    if ns.config:
        values.update(load_config_file(ns.config))
    values.update(explicit)
    return validate_config(values)


def _saved_config(run: Path) -> dict[str, Any]:
    from pocketgpt.model.checkpoint import CheckpointError, read_meta

    try:
        config = read_meta(run / "last").get("config")
    except CheckpointError as e:
        raise UserError(f"nothing to resume in {run}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"cannot resume: {run / 'last'} holds no training config")
    return config


def _check_fresh_out(cfg: TrainConfig) -> None:
    """Refuse to silently mix a new run into a run directory that already holds one."""
    out = Path(cfg.out)
    if cfg.resume or not ((out / "last").exists() or (out / ".last.old").exists()):
        return
    if not cfg.overwrite:
        raise UserError(
            f"{out} already holds a run: continue it with --resume {out}, or pass --overwrite, or choose another --out"
        )
    for name in ("last", "best", ".last.old", ".best.old", "metrics.jsonl"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[int], None]) -> Iterator[None]:
    """SIGTERM/SIGINT call `stop(signum)`: the trainer stops after the current step (or at once, by raising,
    while it prepares); the same signal again acts at once."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        stop(signum)  # may raise (Interrupted): last

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = resolve_train_config(ns)
    _check_fresh_out(cfg)
    from pocketgpt.training.distributed import init_distributed, shutdown
    from pocketgpt.training.metrics import METRICS_FILENAME, MetricsWriter
    from pocketgpt.training.trainer import Trainer

    ctx = init_distributed(cfg.device, cfg.dist_timeout)
    metrics = MetricsWriter(Path(cfg.out) / METRICS_FILENAME if ctx.is_main else None)
    trainer = Trainer(cfg, ctx, metrics)
    try:
        with stop_on_signals(trainer.request_stop):
            result = trainer.run()
    except UserError as e:
        metrics.error(str(e))
        raise
    except Interrupted as e:  # a signal while preparing: nothing to save, stop now
        print(f"pocketgpt: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        metrics.error("interrupted")
        return 128 + signal.SIGINT
    except Exception as e:
        metrics.error(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    finally:
        metrics.close()
        trainer.release()  # the DDP model goes before its process group (training.distributed.shutdown)
        shutdown(ctx)
    if result.status == "cancelled" and trainer.stop_signal is not None:
        return 128 + trainer.stop_signal  # tells a supervisor "cancelled, saved" apart from "finished"
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    cfg = resolve_train_config(ns)
    from pocketgpt.model.tokenizer import Tokenizer
    from pocketgpt.training.data import prepare_data

    tokenizer = None
    if cfg.init_from:
        try:
            tokenizer = Tokenizer.from_file(cfg.init_from)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise UserError(f"cannot read the tokenizer of {cfg.init_from}: {e}") from None
    try:
        with stop_on_signals(_raise_interrupted):
            data = prepare_data(cfg.data, cfg.prepared_dir, tokenizer_vocab=cfg.tokenizer_vocab,
                                val_fraction=cfg.val_fraction, tokenizer=tokenizer, log=_log_stderr)
    except Interrupted as e:
        print(f"pocketgpt: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    m = data.meta
    print(f"{data.path}: {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens, "
          f"{m['train_bytes'] + m['val_bytes']:,} bytes, vocab {m['vocab_size']}, fingerprint {m['fingerprint'][:12]}")
    return 0


def _raise_interrupted(signum: int) -> None:
    raise Interrupted(signum)


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def normalize_argv(argv: list[str]) -> list[str]:
    """No subcommand means `train` (`python -m pocketgpt.training --data x` trains)."""
    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["train", *argv]


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns the exit code."""
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    ns = build_parser().parse_args(args)
    try:
        return ns.func(ns)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
