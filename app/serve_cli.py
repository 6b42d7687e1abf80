"""`pocketgpt serve` (the HTTP server) and `pocketgpt generate` (one prompt, streamed to the terminal).

`app.cli` imports this module lazily, so `pocketgpt train` never pays for the web stack.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import signal
import sys
from types import FrameType
from typing import Any

from pydantic import ValidationError

from pocketgpt.app.settings import Settings


def _settings(overrides: dict[str, Any], command: str) -> Settings | None:
    """Settings from the environment with CLI flags on top, or None after printing why not."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"pocketgpt {command}: invalid settings: {problems}", file=sys.stderr)
        return None


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint directory (env POCKETGPT_CHECKPOINT)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (env POCKETGPT_DEVICE)")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16 (env POCKETGPT_DTYPE)")
    parser.add_argument("--quantize", help="none or int8: weight-only int8 Linear layers (env POCKETGPT_QUANTIZE)")
    parser.add_argument("--threads", type=int, help="CPU threads for the model; default: cores less one "
                        "(env POCKETGPT_THREADS)")
    parser.add_argument("--compile", action="store_const", const=True,
                        help="CPU: compile the decode step, ~30 s at load (env POCKETGPT_COMPILE)")


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pocketgpt serve", description="Serve a checkpoint over HTTP. "
                                     "Every POCKETGPT_* variable is read; flags override them.")
    _model_flags(parser)
    parser.add_argument("--host", help="bind address (env POCKETGPT_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env POCKETGPT_PORT, default 8000)")
    parser.add_argument("--max-running", type=int, help="KV-cache slots (env POCKETGPT_MAX_RUNNING)")
    parser.add_argument("--max-queue", type=int, help="waiting requests before 429 (env POCKETGPT_MAX_QUEUE)")
    parser.add_argument("--log-level", help="debug, info, warning (env POCKETGPT_LOG_LEVEL)")
    _ray_flags(parser)
    args = parser.parse_args(argv)
    ray_args = {k: vars(args).pop(k) for k in ("replicas", "autoscale", "replica_cpus")}
    ray_args["address"] = vars(args).pop("ray")
    settings = _settings(vars(args), "serve")
    if settings is None:
        return 2
    if ray_args["address"] is not None or ray_args["replicas"] is not None or ray_args["autoscale"] is not None:
        return _serve_ray(parser, settings, **ray_args)

    from pocketgpt.app.main import create_app

    return run_server(create_app(settings), settings)


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_server(app: Any, settings: Settings) -> int:
    """Serve `app` with uvicorn until SIGTERM / SIGINT; return 0 after a graceful stop.

    uvicorn waits for open connections `shutdown_grace_s + 2` seconds, after the app's drain has ended every
    request still running (app/shutdown.py). Once done, uvicorn re-raises the signal it caught against the
    handler found before it started; that handler is `_stopped`, so a requested, completed shutdown exits 0
    rather than dying of the signal (143), and a signal before uvicorn is up still stops the process.
    """
    import uvicorn

    from pocketgpt.app.server import uvicorn_options
    from pocketgpt.app.shutdown import SIGNALS, UVICORN_MARGIN_S

    previous = {sig: signal.signal(sig, _stopped) for sig in SIGNALS}
    try:
        # Our access log replaces uvicorn's (it has the request id, tokens and timings).
        uvicorn.run(app, host=settings.host, port=settings.port, access_log=False,
                    log_level=settings.log_level.lower(),
                    timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + UVICORN_MARGIN_S),
                    **uvicorn_options(settings))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# -- Ray Serve (optional: `pip install 'pocketgpt[ray]'`) --------------------------------------------------
def _ray_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Serve", "serve replicas on a Ray cluster (README: Scaling out)")
    group.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="deploy with Ray Serve on the cluster at ADDRESS (HEAD:6379, or auto); none: "
                       "$RAY_ADDRESS, else a cluster `ray start` began on this machine, else a new local instance")
    scale = group.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="replicas follow ongoing requests per replica "
                       "(target: --max-running)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")


def _serve_ray(parser: argparse.ArgumentParser, settings: Settings, address: str | None, replicas: int | None,
               autoscale: str | None, replica_cpus: float) -> int:
    if address is None:
        parser.error("--replicas and --autoscale need --ray")
    if replicas is not None and replicas < 1:
        parser.error("--replicas must be at least 1")
    from pocketgpt.app import ray_cli  # imports no ray

    try:
        bounds = ray_cli.parse_autoscale(autoscale) if autoscale is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    problem = ray_cli.check_model(settings)
    if problem:
        print(f"pocketgpt serve --ray: {problem}", file=sys.stderr)
        return 2
    try:
        importlib.import_module("ray.serve")  # only to know it is there: ray_cli imports what it uses
    except ImportError as exc:
        print(f"pocketgpt serve: --ray needs Ray Serve, which is not installed ({exc.name or 'ray'} is missing): "
              "pip install 'pocketgpt[ray]'", file=sys.stderr)
        return 2
    return ray_cli.run(settings, address, replicas=replicas, autoscale=bounds, replica_cpus=replica_cpus)


def generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pocketgpt generate",
                                     description="Stream one completion to the terminal (in-process engine).")
    _model_flags(parser)
    parser.add_argument("prompt", help="the prompt; '-' reads it from stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", help="stop string (repeatable, up to 4)")
    parser.add_argument("--seed", type=int, help="random when absent (printed at the end)")
    args = parser.parse_args(argv)
    settings = _settings({"checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype,
                          "quantize": args.quantize, "compile": args.compile, "threads": args.threads,
                          "max_running": 1, "max_queue": 0},
                         "generate")
    if settings is None:
        return 2
    if settings.checkpoint is None:
        print("pocketgpt generate: no checkpoint: pass --checkpoint DIR or set POCKETGPT_CHECKPOINT",
              file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return asyncio.run(_generate(settings, prompt, args))


async def _generate(settings: Settings, prompt: str, args: argparse.Namespace) -> int:
    from pocketgpt.app.engine.holder import EngineHolder
    from pocketgpt.app.engine.loader import load_engine
    from pocketgpt.app.errors import APIError
    from pocketgpt.app.generation import Generation
    from pocketgpt.app.schemas import GenerateRequest
    from pocketgpt.model.checkpoint import CheckpointError

    try:
        request = GenerateRequest(
            prompt=prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"pocketgpt generate: {problems}", file=sys.stderr)
        return 2
    holder = EngineHolder(lambda path: load_engine(path, settings))
    try:
        await holder.load(settings.checkpoint)  # type: ignore[arg-type]
    except CheckpointError as exc:
        print(f"pocketgpt generate: cannot load checkpoint {settings.checkpoint}: {exc}", file=sys.stderr)
        return 2
    try:
        generation = Generation.start(holder, request.to_spec(settings))
        async for token in generation.tokens():
            sys.stdout.write(token.text)
            sys.stdout.flush()
        result = generation.final()
        sys.stdout.write("\n")
        print(f"[{result.completion_tokens} tokens, {result.finish_reason}, seed {result.seed}, "
              f"{result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        return 0
    except APIError as exc:
        print(f"\npocketgpt generate: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await holder.close()


def main(argv: list[str]) -> int:
    """Entry point from app.cli: argv[0] is `serve` or `generate`."""
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "generate":
        return generate(rest)
    print(f"pocketgpt: unknown serving command {command!r}", file=sys.stderr)
    return 2
