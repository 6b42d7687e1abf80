"""`pocketgpt` console entry point: a thin dispatcher over the project's subcommands.

`train`, `eval`, `prepare`, `import-hf` and `export` run `python -m pocketgpt.training <subcommand> ...` in
place of this process (os.execv), so the app package never imports training internals. `serve` and
`generate` run in-process through `app.serve_cli.main(argv)`, imported lazily so that
`pocketgpt train` does not pay for importing the web stack.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from pocketgpt.launch import child_env

TRAINING_COMMANDS = ("train", "eval", "prepare", "import-hf", "export")
SERVING_COMMANDS = ("serve", "generate")

USAGE = """usage: pocketgpt <command> [args...]

commands:
  train | eval | prepare | import-hf | export
                            run `python -m pocketgpt.training <command> ...`
  serve | generate          run the web server / generate text from a checkpoint

`pocketgpt <command> --help` shows a command's options."""


def _not_available(what: str) -> int:
    print(f"pocketgpt: {what} is not yet available", file=sys.stderr)
    return 2


def _exec_training(argv: list[str]) -> int:
    """Replace this process with `python -m pocketgpt.training <argv...>`; returns only on failure."""
    if importlib.util.find_spec("pocketgpt.training.__main__") is None:
        return _not_available(f"'{argv[0]}'")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "pocketgpt.training", *argv], child_env())
    return 1  # unreachable: execv does not return on success (it raises OSError on failure)


def _run_serving(argv: list[str]) -> int:
    """Run `app.serve_cli.main(argv)` in-process, argv[0] being `serve` or `generate`."""
    try:
        serve_cli = importlib.import_module("pocketgpt.app.serve_cli")
    except ModuleNotFoundError as exc:
        # Only the module itself being absent means "not written yet"; a missing dependency
        # inside it is a real error and must surface with its traceback.
        if exc.name != "pocketgpt.app.serve_cli":
            raise
        return _not_available(f"'{argv[0]}'")
    result = serve_cli.main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `pocketgpt <command> [args...]`; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command = args[0]
    if command in TRAINING_COMMANDS:
        return _exec_training(args)
    if command in SERVING_COMMANDS:
        return _run_serving(args)
    print(f"pocketgpt: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
