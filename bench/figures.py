"""The figures README.md and docs/ quote, computed from the result files the bench writes: none typed by hand.

    python -m bench.figures          # rewrite the quoted blocks from docs/benchmarks/*.json
    python -m bench.figures --check  # exit 1 when a block is not what the result files give (a test runs this)

A quoted block sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in a Markdown file and cites the
result file each figure comes from. bench/analysis.md holds `{name}` placeholders that `analysis_values` fills
(bench/report.py renders it into docs/benchmarks.md). Ratios are the bench's own round-by-round medians where
it records them, otherwise median over median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT

RESULTS = ROOT / "docs" / "benchmarks" / "results.json"  # python -m bench
ONE_THREAD = ROOT / "docs" / "benchmarks" / "results-1thread.json"  # python -m bench --threads 1 --only decode serve
SOAK = ROOT / "docs" / "benchmarks" / "soak.json"  # python bench/soak.py
CLIENT_COST = ROOT / "docs" / "benchmarks" / "client_cost.json"  # python -m bench.client_cost
ENGINE = ROOT / "docs" / "benchmarks" / "engine.json"  # python -m bench.engine
ENGINE_SPEC_TRAINED = ROOT / "docs" / "benchmarks" / "engine-spec-trained.json"  # bench.engine --checkpoint
FIRST_TOKEN = ROOT / "docs" / "benchmarks" / "first-token.json"  # python -m bench.first_token --compare-dev
DOCKER_E2E = ROOT / "docs" / "benchmarks" / "docker-e2e.json"  # POCKETGPT_E2E_TIMINGS=FILE make test-docker
GQA = ROOT / "docs" / "benchmarks" / "gqa.json"  # python -m bench.gqa
LORA = ROOT / "docs" / "benchmarks" / "lora.json"  # python -m bench.lora
BUDGET = ROOT / "docs" / "benchmarks" / "budget.json"  # python -m bench.budget
LOGPROBS = ROOT / "docs" / "benchmarks" / "logprobs.json"  # python -m bench.logprobs
STRUCTURED = ROOT / "docs" / "benchmarks" / "structured.json"  # python -m bench.structured
STRUCTURED_DOC = ROOT / "docs" / "structured.md"
NCHOICES = ROOT / "docs" / "benchmarks" / "nchoices.json"  # python -m bench.nchoices
INT8 = ROOT / "docs" / "benchmarks" / "int8.json"  # python -m bench.int8
KERNELS = ROOT / "docs" / "benchmarks" / "kernels.json"  # python -m bench.kernels
README = ROOT / "README.md"
RELIABILITY = ROOT / "docs" / "reliability.md"

# nanoGPT's README reports a validation loss of 1.88 nats per character for its CPU Shakespeare run (4 layers,
# 4 heads, 128 wide, context 64, batch 12, "about 3 minutes" on a laptop): 1.88 / ln 2 = 2.71 bits per
# character, i.e. per byte (the text is ASCII). The training target is that published figure rounded up. It is
# a constant, not a measurement: the nanoGPT-style loop the bench runs measures its own figure in the same run.
NANOGPT_PUBLISHED_LOSS_NATS = 1.88
NANOGPT_TARGET_BPB = math.ceil(NANOGPT_PUBLISHED_LOSS_NATS / math.log(2) * 100) / 100  # 2.72


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def rel(path: Path, start: Path = ROOT) -> str:
    """`path` relative to the folder `start` (a link from a Markdown file there)."""
    return Path(os.path.relpath(path, start)).as_posix()


def num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def times(value: float) -> str:
    return f"{value:.2f}x"


def _level(results: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    return next((x for x in results["sections"].get("serve", {}).get("levels", [])
                 if x["concurrency"] == concurrency), None)


# -- README: the headline table ----------------------------------------------------------------------------------
def readme_performance(results: dict[str, Any], soak: dict[str, Any] | None) -> str:
    """The README's performance table: a row per headline figure, each naming its result file."""
    src = f"[{rel(RESULTS)}]({rel(RESULTS)})"
    m = results["machine"]
    sec = results["sections"]
    rows = ["| what | pocketgpt | peer in the same run | from |", "| --- | --: | --: | --- |"]
    if "decode" in sec:
        d = sec["decode"]
        tok, r = d["tok_s"], d["ratios"]
        peers = []
        if "transformers" in tok:
            peers.append(f"`transformers` `generate()` {num(tok['transformers']['median'])} tok/s "
                         f"({times(r['engine/transformers']['median'])})")
        peers.append(f"bare static-KV loop {num(tok['bare_static_kv']['median'])} "
                     f"({times(r['engine/bare_static_kv']['median'])})")
        if "naive_recompute" in tok:
            peers.append(f"recompute-context {num(tok['naive_recompute']['median'])}")
        model = results.get("model", {})
        rows.append(f"| decode, one stream, {model.get('n_layer')}×{model.get('n_embd')} model, in-process engine | "
                    f"{num(tok['engine']['median'])} tok/s | {'; '.join(peers)} | {src} `decode` |")
        rows.append(f"| the same through HTTP + SSE | {num(tok['http_sse']['median'])} tok/s "
                    f"({times(r['http_sse/engine']['median'])} in-process) | | {src} `decode` |")
    lv32 = _level(results, 32)
    if lv32:
        rows.append(f"| 32 concurrent HTTP streams, aggregate | {num(lv32['aggregate_tok_s']['median'])} tok/s, "
                    f"{lv32['failed']} failed of {lv32['requests']} | bare loop at batch 32: "
                    f"{num(lv32['bare_tok_s']['median'])} ({times(lv32['ratio_to_bare']['median'])}) | {src} `serve` |")
    inter = sec.get("serve", {}).get("interference")
    if inter:
        rows.append(f"| a {inter['long_prompt_tokens']}-token prompt arriving during {inter['streams']} streams | "
                    f"their inter-token p99 ×{inter['p99_ratio']['median']:.2f} | (chunked prefill) | "
                    f"{src} `serve.interference` |")
    t = sec.get("train", {})
    if "speed" in t:
        sp, q = t["speed"], t["quality"]
        ours, ref = sp["ours_tokens_per_s"]["median"], sp["nanogpt_tokens_per_s"]["median"]
        shape = t["shape"]
        rows.append(f"| training, {shape['n_layer']}×{shape['n_embd']}, context {shape['block_size']}, batch "
                    f"{shape['batch_size']} | {num(ours)} tok/s, MFU {sp['ours_mfu']['median'] * 100:.0f}% | "
                    f"nanoGPT-style loop {num(ref)} tok/s ({times(ours / ref)}) | {src} `train.speed` |")
        rows.append(f"| Tiny Shakespeare val bits/byte after {t['budget_s']:.0f} s | {q['ours']['val_bpb']:.2f} | "
                    f"nanoGPT-style char model {q['nanogpt']['val_bpb']:.2f} | {src} `train.quality` |")
    if soak:
        s = f"[{rel(SOAK)}]({rel(SOAK)})"
        rows.append(f"| soak: {soak['clients']} streaming clients, {soak['duration_s']:.0f} s, `{soak['preset']}` "
                    f"model | {num(soak['requests_completed'])} requests, {soak['errors']} errors, server RSS "
                    f"{soak['rss_mib']['start']:.0f} → {soak['rss_mib']['end']:.0f} MiB | | {s} |")
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    quick = " **A `--quick` smoke run: not the reference figures.**" if results.get("quick") else ""
    return "\n".join([
        f"Measured on this project's {m['cores']}-core CPU machine ({m['cpu']}, {m['torch_threads']} torch threads; "
        f"load average {load} at the start of the `python -m bench` run of {results['started']}: the machine is "
        "shared, so ratios within one run are the figures to trust). Medians over rounds (a ratio is the median of "
        "the round-by-round ratios where the bench records one); every figure is generated by "
        f"`python -m bench.figures` from the result file named beside it:{quick}",
        "", *rows,
    ])


# -- docs/reliability.md: the soak -------------------------------------------------------------------------------
def soak_section(soak: dict[str, Any] | None) -> str:
    """The soak's figures for docs/reliability.md, from docs/benchmarks/soak.json."""
    if soak is None:
        return f"No soak result recorded yet (`python bench/soak.py` writes {rel(SOAK)})."
    ttft, itl, rss, load = soak["ttft_ms"], soak["itl_ms"], soak["rss_mib"], soak["load_average"]
    link = rel(SOAK, RELIABILITY.parent)
    lines = [
        f"From [{link}]({link}), the run of {soak['started']}: `{_without_note(soak['command'])}`. "
        f"{soak['clients']} clients for {soak['duration_s']:.0f} s against a random-init `{soak['preset']}` model "
        f"({num(soak['parameters'])} parameters), up to {soak['max_new_tokens']} new tokens per request. "
        f"Load average {load['start']:.1f} at the start, {load['end']:.1f} at the end (highest sampled "
        f"{load['max_sampled']:.1f}) on {soak['cpu_count']} cores."
        + (f" Note recorded with the run: {soak['note']}." if soak.get("note") else ""),
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| requests completed | {num(soak['requests_completed'])} ({soak['requests_per_s']:.1f} / s) |",
        f"| errors | **{soak['errors']}** |",
        f"| tokens streamed | {num(soak['tokens'])} ({num(soak['tokens_per_s'])} tokens/s) |",
        f"| time to first token | p50 {ttft['p50']} ms, p90 {ttft['p90']} ms, p99 {ttft['p99']} ms |",
        f"| inter-token latency | p50 {itl['p50']} ms, p90 {itl['p90']} ms, p99 {itl['p99']} ms |",
        f"| server RSS | {rss['start']:.0f} MiB at start, {rss['end']:.0f} MiB at the end, "
        f"{rss['max']:.0f} MiB at most; "
        f"{rss['growth_last_third']:+.1f} MiB over the last third |",
        f"| server alive and ready afterwards | {'yes' if soak['server_alive_after'] else '**no**'} |",
    ]
    return "\n".join(lines)


def _without_note(command: str) -> str:
    """The soak's command line less its `--note` (quoted in full beside it)."""
    words = shlex.split(command)
    if "--note" in words:
        i = words.index("--note")
        del words[i : i + 2]
    return shlex.join(words)


# -- README.md: quick start and Docker -------------------------------------------------------------------------------
def first_token_section(ft: dict[str, Any] | None) -> str:
    """`git clone` to the first streamed token with `make serve`, from docs/benchmarks/first-token.json."""
    if ft is None:
        return f"No measurement recorded yet (`python -m bench.first_token --compare-dev` writes {rel(FIRST_TOKEN)})."
    s, link = ft["seconds"], rel(FIRST_TOKEN)
    limit = ft["starter_max_time_s"]
    cap = f"at most {limit} s of training" if isinstance(limit, int | float) else "training up to its default cap"
    text = (f"From `git clone` to the first streamed token (`curl -N`) took {s['clone_to_first_token'] / 60:.1f} "
            f"minutes on {ft['cores']} CPU cores (load average {ft['load_average_before'][0]:.0f} from other work): "
            f"{s['install_runtime']:.0f} s installing, {s['train_starter']:.0f} s for the starter (preparing its data, "
            f"then {cap}), {s['server_start']:.0f} s starting the server.")
    if "comparison" in ft:
        c = ft["comparison"]
        text += (f" Installing the dev extra too, as `make serve` used to, took another {s['install_dev_extra']:.0f} s "
                 f"in the same run ({times(c['ratio'])} the whole wait; {ft['packages_with_dev']} packages instead of "
                 f"{ft['packages_runtime']}; timed as an addition to the same venv).")
    return text + (f" From [{link}]({link}): `{ft['command']}`, pip's cache as found, torch from a local wheel.")


def docker_e2e_section(d: dict[str, Any] | None) -> str:
    """How long the Docker end-to-end test takes, from docs/benchmarks/docker-e2e.json."""
    if d is None:
        return f"No timing recorded yet (`POCKETGPT_E2E_TIMINGS={rel(DOCKER_E2E)} make test-docker` writes it)."
    s, link = d["seconds"], rel(DOCKER_E2E)
    return (f"On {d['cores']} CPU cores (load average {d['load_average_after'][0]:.0f} from other work) the image "
            f"build took {s['image_build'] / 60:.1f} minutes ({d['builder']}) and the Compose stages "
            f"{s['compose_stages'] / 60:.1f} minutes; `docker compose stop` took {s['stop_during_bootstrap_s']:.1f} s "
            f"during the starter's training and {s['stop_during_job_s']:.1f} s during a training job. "
            f"Before the build: {s['base_image']:.0f} s for the base image (0 when the stand-in was already built), "
            f"{s['wheelhouse_and_context']:.0f} s for the wheelhouse and build context (near 0 when cached). "
            f"From [{link}]({link}).")


# -- bench/analysis.md: the placeholders ---------------------------------------------------------------------------
def analysis_values(results: dict[str, Any], one_thread: dict[str, Any] | None = None,
                    client_cost: dict[str, Any] | None = None) -> dict[str, str]:
    """`{name}` -> figure for bench/analysis.md; a figure whose section was not run reads `(not measured)`."""
    values: dict[str, str] = {"nanogpt_target_bpb": f"{NANOGPT_TARGET_BPB:.2f}",
                              "nanogpt_published_loss": f"{NANOGPT_PUBLISHED_LOSS_NATS:.2f}"}
    sec = results["sections"]
    if "decode" in sec:
        d = sec["decode"]
        values["engine_vs_bare"] = times(d["ratios"]["engine/bare_static_kv"]["median"])
        fl = d["floor"]
        if fl.get("floor_tok_s"):
            values["floor_tok_s"] = num(fl["floor_tok_s"])
            values["floor_vs_bare"] = times(fl["floor_tok_s"] / d["tok_s"]["bare_static_kv"]["median"])
            values["copy_gb_s"] = num(fl["copy_bandwidth_gb_s"])
    for c in (32, 64):
        lv = _level(results, c)
        if lv:
            values[f"http{c}_vs_bare"] = times(lv["ratio_to_bare"]["median"])
    lv1 = _level(one_thread, 32) if one_thread else None
    if lv1:
        values["one_thread_http32_vs_bare"] = times(lv1["ratio_to_bare"]["median"])
        values["one_thread_http32_tok_s"] = num(lv1["aggregate_tok_s"]["median"])
    lv2 = _level(results, 32)
    if lv2:
        values["http32_tok_s"] = num(lv2["aggregate_tok_s"]["median"])
    probe = results.get("thread_probe")
    if probe:
        values["probe_main_us"] = f"{probe['main_thread_us']['median']:.1f}"
        values["probe_worker_us"] = f"{probe['worker_thread_us']['median']:.1f}"
    if client_cost:
        c = client_cost["clients"]
        values["client_hand_us"] = f"{c['hand-rolled']['cpu_us_per_token']['median']:.0f}"
        values["client_httpx_us"] = f"{c['httpx-sse']['cpu_us_per_token']['median']:.0f}"
        values["client_cost_ratio"] = times(client_cost["httpx_sse_over_hand_rolled_cpu"]["median"])
        values["client_cost_load"] = f"{client_cost['machine']['load_average_start'][0]:.0f}"
    t = sec.get("train", {})
    if "quality" in t:
        values["nanogpt_bpb"] = f"{t['quality']['nanogpt']['val_bpb']:.2f}"
        values["nanogpt_steps"] = num(t["quality"]["nanogpt"]["steps"])
        values["train_budget_s"] = f"{t['budget_s']:.0f}"
    return values


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return f"(not measured: {key})"


def fill(template: str, values: dict[str, str]) -> str:
    """`template` with its `{name}` placeholders replaced (str.format_map; a missing one says so)."""
    return template.format_map(_Missing(values))


def readme_engine(engine: dict[str, Any]) -> str:
    """The README's engine v2 table: long prompts, the prefix cache, speculative decoding."""
    sec = engine["sections"]
    med = lambda s: s["median"]  # noqa: E731
    src = f"[{rel(ENGINE)}]({rel(ENGINE)})"
    lines = [
        f"Engine v2 (`python -m bench.engine` of {engine['started']}: in-process, "
        f"{engine['model']['n_layer']}×{engine['model']['n_embd']} model with context {engine['model']['block_size']}, "
        f"random weights; the load average was {engine['machine']['load_average'][0]:.0f} before and "
        f"{engine['load_average_after'][0]:.0f} after on 2 cores, so single figures swing widely; medians of "
        f"{engine['rounds']} rounds; every figure from {src}, also as a table in docs/benchmarks/engine.md):", "",
        "| what | pocketgpt | compared with, same run |", "| --- | --: | --: |",
    ]
    if "long" in sec:
        long = sec["long"]
        lines += [
            f"| time to first token of a {long['prompt_tokens']}-token prompt, nothing else running | "
            f"{med(long['ttft_over_forward']['engine']):.2f}x one plain `GPT.forward` of the prompt (the engine "
            f"runs the faster inference layout) | 16-token chunks (the engine before): "
            f"{med(long['ttft_over_forward']['chunks_16']):.2f}x |",
            f"| a 512-token prompt arriving during 16 streams (in-process) | their inter-token p99 "
            f"×{med(long['interference']['p99_ratio']):.2f} | |",
        ]
    if "prefix" in sec:
        sp, chat = sec["prefix"]["shared_prefix"], sec["prefix"]["chat"]
        lines += [
            f"| 1,024-token shared prefix + 16-token suffix | time to first token "
            f"{med(sp['miss_over_hit']):.0f}x faster on a prefix-cache hit | |",
            f"| {chat['streams']} streams sharing a {chat['system_tokens']}-token system prompt | "
            f"{num(med(chat['aggregate_tok_s']['on']))} tok/s, TTFT p50 {num(med(chat['ttft_p50_ms']['on']))} ms "
            f"with the prefix cache | {num(med(chat['aggregate_tok_s']['off']))} tok/s, "
            f"{num(med(chat['ttft_p50_ms']['off']))} ms without |",
        ]
    if "spec" in sec and "code_sampled" in sec["spec"]:
        spec = sec["spec"]
        code, prose, sampled = spec["code"], spec["prose"], spec["code_sampled"]
        lines.append(
            f"| n-gram speculation, batch 1, code continuations (tokens per CPU second, 1 thread, "
            f"{spec['rounds']} interleaved rounds) | greedy {med(code['spec_over_plain']):.2f}x, identical tokens: "
            f"{code['identical_tokens']}; temperature 0.7 {med(sampled['spec_over_plain']):.2f}x, same tokens per "
            f"seed: {sampled['identical_tokens']} | drafts that always miss: {med(code['miss_over_plain']):.2f}x; "
            f"prose {med(prose['spec_over_plain']):.2f}x |")
    trained = load(ENGINE_SPEC_TRAINED)
    if trained is not None and "spec" in trained["sections"]:
        spec, m = trained["sections"]["spec"], trained["model"]
        code, prose = spec["code"], spec["prose"]
        lines.append(
            f"| the same on a trained {m['n_layer']}×{m['n_embd']} model ({trained['weights']}; "
            f"[{rel(ENGINE_SPEC_TRAINED)}]({rel(ENGINE_SPEC_TRAINED)})) | greedy code "
            f"{med(code['spec_over_plain']):.2f}x (accepted / drafted {code['spec_accepted_over_drafted']:.2f}), "
            f"identical tokens: {code['identical_tokens']} | prose {med(prose['spec_over_plain']):.2f}x |")
    return "\n".join(lines) + "\n"


# -- README: Llama-family figures ---------------------------------------------------------------------------------
def readme_llama(gqa: dict[str, Any], lora: dict[str, Any]) -> str:
    """The README's figures for a SmolLM2-135M-shaped model: engine vs transformers, KV cache, LoRA."""
    g, lo = f"[{rel(GQA)}]({rel(GQA)})", f"[{rel(LORA)}]({rel(LORA)})"
    kv = gqa["kv_cache_bytes_per_token"]
    rows = ["| what | pocketgpt | peer in the same run | from |", "| --- | --: | --: | --- |"]
    for batch in (1, 8):
        b = gqa[f"batch_{batch}"]
        rows.append(f"| {gqa['new_tokens']} greedy tokens, {batch} request{'s' if batch > 1 else ''} at once, "
                    f"in-process engine | {num(b['engine_tok_s'], 1)} tok/s | `transformers` `generate()` "
                    f"{num(b['transformers_tok_s'], 1)} tok/s ({times(b['ratio'])}); outputs identical "
                    f"{b['identical_greedy_outputs']} | {g} `batch_{batch}` |")
    for batch in (1, 8):  # the served path, measured in the same rounds (absent from older result files)
        b = gqa[f"batch_{batch}"]
        if "http_tok_s" in b:
            rows.append(f"| the same, served: {batch} SSE stream{'s' if batch > 1 else ''} of `/v1/generate` from a "
                        f"`pocketgpt serve` subprocess | {num(b['http_tok_s'], 1)} tok/s | in-process engine "
                        f"{num(b['engine_tok_s'], 1)} tok/s (HTTP / in-process {b['http_over_engine']:.2f}) | "
                        f"{g} `batch_{batch}.http_tok_s` |")
    rows.append(f"| KV cache per token (fp32) | {num(kv['gqa_3_kv_heads'])} bytes (3 KV heads) | without GQA (9): "
                f"{num(kv['without_gqa_9_kv_heads'])} bytes ({kv['ratio']:.3f}) | {g} `kv_cache_bytes_per_token` |")
    f, r, ratio = lora["full"], lora["lora_run"], lora["ratios_lora_over_full"]
    spec = lora["lora"]
    rows.append(f"| fine-tuning step, batch {lora['batch']}×{lora['seq']}, LoRA r={spec['r']} on {spec['targets']} | "
                f"{r['step_s_median']:.2f} s, peak RSS {num(r['peak_rss_mib'])} MiB, "
                f"{num(r['trainable_params'])} trainable | full fine-tuning {f['step_s_median']:.2f} s "
                f"({times(ratio['step_time'])}), {num(f['peak_rss_mib'])} MiB ({times(ratio['peak_rss'])}) | "
                f"{lo} |")
    load_g = ", ".join(f"{x:.1f}" for x in gqa["load_average_before"])
    load_l = ", ".join(f"{x:.1f}" for x in lora["load_average_before"])
    m = gqa["model"]
    served = ""
    if "http" in gqa:  # the served rows send the prompts as text, which the server tokenises afresh
        lo_n, hi_n = min(gqa["http"]["http_prompt_tokens"]), max(gqa["http"]["http_prompt_tokens"])
        served = (f" (the served rows send the prompts as text, {lo_n}-{hi_n} tokens once the server tokenises "
                  "them; tokens/s there run from sending to the last token's arrival)")
    return "\n".join([
        f"A model with SmolLM2-135M's shape ({m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} heads and "
        f"{m['n_kv_head']} KV heads, MLP {m['mlp_width']}, vocab {num(m['vocab_size'])}; random weights, fp32, CPU, "
        f"{gqa['machine']['torch_threads']} torch thread), made with `transformers` and imported with `import-hf`. "
        f"Generation includes the {gqa['prompt_tokens']}-token prompt's prefill on both sides{served}; the machine was "
        f"shared (load average {load_g} at the start of `{gqa['command']}`, {load_l} at the start of "
        f"`{lora['command']}`):",
        "", *rows,
    ])


# -- blocks in Markdown files ----------------------------------------------------------------------------------------
def readme_budget(budget: dict[str, Any]) -> str:
    """README's training-budget table: held-out bits per byte of each contender, per corpus and budget."""
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for r in budget["rows"]:
        rows.setdefault((r["corpus"], r["budget_s"]), {})[r["config"]] = r["bpb"]
    load_avg = budget["load_average_start"][0]
    shares = [r["cpu_per_wall"] for r in budget["rows"] if "cpu_per_wall" in r]
    if shares:  # every contender a high-priority child: how much of a core the least served one got
        how = (f"each contender its own process at niceness {budget['rows'][0].get('niceness', 0)} on a machine at "
               f"load average {load_avg:.1f}; it got {min(shares):.2f} to {max(shares):.2f} of a core (CPU time over "
               "wall time, per row in the JSON)")
    else:
        how = f"load average {load_avg:.1f} at the start: a shared machine, so the budgets bought less training"
    lines = [f"Held-out bits per byte (lower is better) from [{rel(BUDGET)}]({rel(BUDGET)}) (`python -m bench.budget`, "
             f"{budget['threads']} thread(s), {how}):", "",
             "| corpus | budget | defaults (`--data --max-time` only) | previous defaults | nanoGPT-style loop |",
             "| --- | --: | --: | --: | --: |"]
    for (corpus, seconds), by in rows.items():
        cells = [num(by[c], 3) if c in by else "–" for c in ("new", "previous", "nanogpt")]
        lines.append(f"| {corpus} | {seconds:g} s | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def readme_logprobs(lp: dict[str, Any]) -> str:
    """The README's cost of logprobs: decode throughput with rows asking, and scoring a prompt."""
    dec, sc = lp["decode"], lp["scoring"]
    src = f"[{rel(LOGPROBS)}]({rel(LOGPROBS)})"
    load = ", ".join(f"{x:.1f}" for x in lp["machine"]["load_average"])
    return "\n".join([
        f"What they cost (`{lp['command'].strip()}` of {lp['started']}: in-process, the {lp['model']['n_layer']}"
        f"×{lp['model']['n_embd']} headline model, vocab {num(lp['model']['vocab_size'])}, random weights, "
        f"{lp['machine']['torch_threads']} threads on a shared machine, load average {load} at the start; medians of "
        f"{lp['rounds']} rounds' ratios; from {src}):", "",
        "| what | against the plain case, same run |", "| --- | --: |",
        f"| {dec['streams']} greedy streams × {dec['new_tokens']} tokens, one asking for `logprobs: 5` | "
        f"{dec['over_none']['one_top5']:.2f}x the tokens/s of none asking |",
        f"| the same, every stream asking for `logprobs: 20` | {dec['over_none']['all_top20']:.2f}x |",
        f"| scoring a {sc['prompt_tokens']}-token prompt (`echo`, `logprobs: 1`, `max_tokens: 0`) | "
        f"{sc['logprobs_over_plain']:.2f}x the time of prefilling it plainly |",
    ]) + "\n"


# -- structured output: README and docs/structured.md ------------------------------------------------------------
def structured_engine(s: dict[str, Any], start: Path = ROOT) -> str:
    """Constrained against free decode tokens/s, from docs/benchmarks/structured.json."""
    e, m, link = s["engine"], s["model"], rel(STRUCTURED, start)
    tok = e["tok_s"]

    def cell(name: str) -> str:
        x = tok[name]
        return f"{num(x['median'], 1)} ({num(x['min'], 1)}–{num(x['max'], 1)})"

    def ratio(name: str) -> str:
        x = e[name]
        return f"{times(x['median'])} ({x['min']:.2f}–{x['max']:.2f})"

    load = ", ".join(f"{x:.1f}" for x in s["load_average_before"])
    return "\n".join([
        f"Greedy decode tokens/s of the {m['n_layer']}×{m['n_embd']} bench model (vocabulary {num(m['vocab_size'])}, "
        f"random weights), {e['new_tokens']} tokens per stream, free and constrained by a JSON schema, measured in "
        f"the same rounds (median (min–max) over {tok['batch_1_free']['n']}; {s['machine']['torch_threads']} torch "
        f"thread(s), load average {load} at the start of `{s['command']}` on {s['machine']['cores']} shared cores). "
        f"From [{link}]({link}):",
        "",
        "| streams | free tok/s | JSON schema tok/s | constrained / free |",
        "| --- | --: | --: | --: |",
        f"| 1 | {cell('batch_1_free')} | {cell('batch_1_json')} | {ratio('batch_1_json_over_free')} |",
        f"| 16 (aggregate) | {cell('batch_16_free')} | {cell('batch_16_json')} | {ratio('batch_16_json_over_free')} |",
        f"| 16, one of them constrained | {cell('batch_16_free')} | {cell('batch_16_one_json')} | "
        f"{ratio('batch_16_one_json_over_free')} |",
    ]) + "\n"


def structured_libraries(s: dict[str, Any]) -> str:
    """The grammar libraries' compile and per-token mask times, from docs/benchmarks/structured.json."""
    link = rel(STRUCTURED, STRUCTURED_DOC.parent)
    rows = ["| library | vocabulary | tokenizer setup | schema compile | mask per token |",
            "| --- | --- | --: | --: | --: |"]
    for key, r in s["libraries"].items():
        lib, vocab = key.split("/", 1)
        if "error" in r:
            rows.append(f"| {lib} | {vocab} | {r['error']} | | |")
            continue
        rows.append(f"| {lib} | {vocab} ({num(r['vocab'])}) | {r['tokenizer_s'] * 1000:,.1f} ms | "
                    f"{r['compile_s'] * 1000:,.1f} ms | {r['mask_us_per_token']:,.0f} µs |")
    return "\n".join([f"From [{link}]({link}) (`{s['command']}`, the same run as the table above):", "", *rows]) + "\n"
def readme_nchoices(res: dict[str, Any]) -> str:
    """The README's line on n choices sharing one prefill against n separate requests."""
    ratio = res["separate_over_shared"]
    return (
        f"Measured ([{rel(NCHOICES)}]({rel(NCHOICES)}), `{res['command'].strip()}`, "
        f"{res['machine']['torch_threads']} torch threads, load average {res['machine']['load_average'][0]:.1f} at "
        f"the start: a shared machine, so the times are noisy): {res['n']} sampled choices of a "
        f"{res['prompt_tokens']}-token prompt ({res['new_tokens']} new tokens each, the headline model) ran "
        f"{num(res['shared']['prefill_tokens']['median'])} prompt tokens through the model, against "
        f"{num(res['separate']['prefill_tokens']['median'])} for {res['n']} separate requests submitted together; "
        f"the wait until every choice had its first token was {times(ratio['all_first_token_s']['median'])} "
        f"shorter, until all were done {times(ratio['all_done_s']['median'])} shorter (median over "
        f"{len(res['rounds'])} rounds of separate / shared), with the same tokens either way.\n")


def readme_int8(d: dict[str, Any]) -> str:
    """The int8 block: batch-1 decode beside transformers and llama.cpp, the 135M shape, held-out loss."""
    dec, smol, q = d["decode_6x384_batch1"], d["smollm2_135m_shape"], d["quality"]
    src = "[docs/benchmarks/int8.json](docs/benchmarks/int8.json)"
    lc = dec.get("llamacpp")
    if lc is None:
        llama = (f"llama.cpp (llama-cpp-python, a thread per core, same weights as GGUF): f32 "
                 f"{num(dec['llamacpp_f32_tok_s'])}, q8_0 {num(dec['llamacpp_q8_0_tok_s'])} tok/s")
    else:
        llama = (f"llama.cpp, {lc['note']}: f32 {num(lc['llamacpp_f32_tok_s'])}, q8_0 "
                 f"{num(lc['llamacpp_q8_0_tok_s'])} tok/s")
    load_b = ", ".join(f"{x:.1f}" for x in d["load_average_before"])
    load_a = ", ".join(f"{x:.1f}" for x in d["load_average_after"])
    threads = d["machine"]["torch_threads"]
    rows = [
        "| what | fp32 | int8 | compared with |",
        "| --- | --: | --: | --- |",
        f"| {d['new_tokens']} greedy tokens, batch 1, 6×384 modern layout, in-process engine ({threads} model "
        f"thread{'s' if threads > 1 else ''}) | {num(dec['pocketgpt_fp32_tok_s'])} tok/s | "
        f"{num(dec['pocketgpt_int8_tok_s'])} tok/s ({times(dec['int8_vs_fp32'])}) | `transformers` `generate()` "
        f"{num(dec['transformers_tok_s'])} tok/s; {llama}; fp32 / llama.cpp f32 "
        f"{times(dec['fp32_vs_llamacpp_f32'])}, int8 / q8_0 {times(dec['int8_vs_llamacpp_q8_0'])} |",
    ]
    if "pocketgpt_fp32_all_cores_tok_s" in dec:
        rows.append(f"| the same, fp32, {dec['all_cores']} model threads (one per core) | "
                    f"{num(dec['pocketgpt_fp32_all_cores_tok_s'])} tok/s | | the default "
                    f"{times(dec['threads_vs_all_cores_fp32'])} this |")
    if "pocketgpt_fp32_compiled_tok_s" in dec:
        rows.append(
            f"| the same with `--compile` | {num(dec['pocketgpt_fp32_compiled_tok_s'])} tok/s "
            f"({times(dec['compiled_vs_eager_fp32'])} eager) | {num(dec['pocketgpt_int8_compiled_tok_s'])} tok/s | "
            f"fp32 / llama.cpp f32 {times(dec['fp32_compiled_vs_llamacpp_f32'])}, int8 / q8_0 "
            f"{times(dec['int8_compiled_vs_llamacpp_q8_0'])} |")
    for batch in (1, 32):
        b = smol[f"batch_{batch}"]
        rows.append(f"| SmolLM2-135M shape, batch {batch}, in-process engine | {num(b['fp32_tok_s'], 1)} tok/s | "
                    f"{num(b['int8_tok_s'], 1)} tok/s ({times(b['ratio'])}) | |")
    if "loss_fp32" in q:
        rows.append(f"| held-out loss, {q['model']} trained {q['train_steps']} steps on Tiny Shakespeare | "
                    f"{q['loss_fp32']:.4f} | {q['loss_int8']:.4f} | perplexity ×{q['perplexity_ratio']:.4f} |")
    plural = "s" if threads > 1 else ""
    return (f"`{d['command']}` ({threads} torch thread{plural}; load average {load_b} before, {load_a} after, "
            f"on 2 cores of an {d['machine']['cpu']}: "
            f"single figures swing, ratios within the run are the result; every figure from {src}):\n\n"
            + "\n".join(rows) + "\n")


def readme_kernels(k: dict[str, Any], int8: dict[str, Any] | None) -> str:
    """Why llama.cpp stays ahead at batch 1 on a CPU: the kernels' own limits, from bench.kernels."""
    stream, hot = k["stream"], k["hot_us"]
    head = hot[max(hot, key=lambda shape: int(shape.split("x")[1]))]
    layers = [v for shape, v in hot.items() if v is not head]
    int8_layers = statistics.median(v["int8_weight_only_bf16_over_fp32"] for v in layers)
    ao = ""
    if "torchao_int8_weight_only_over_fp32" in head:
        ao = (f" torchao's int8 weight-only and dynamic-int8 layers run "
              f"{statistics.median(v['torchao_int8_weight_only_over_fp32'] for v in layers):.2f}x and "
              f"{statistics.median(v['torchao_int8_dynamic_over_fp32'] for v in layers):.2f}x fp32's speed.")
    t1, t2 = stream["threads_1"], stream["threads_2"]
    llama = ""
    f32 = (int8 or {}).get("decode_6x384_batch1", {}).get("llamacpp_f32_tok_s")
    if f32 is not None:
        gb_s = f32 * stream["weights_mb"] / 1e3
        where = "faster than PyTorch's kernels stream them" if gb_s > t2["gb_s"] else "near that ceiling"
        llama = (f", and llama.cpp's f32 decode above ({num(f32)} tokens/s) reads the same weights at "
                 f"{gb_s:.1f} GB/s, {where}")
    return (f"What the kernels allow ([{rel(KERNELS)}]({rel(KERNELS)}), `{k['command']}`, {k['machine']['cpu']}): "
            f"one-row products over the 6×384 model's {stream['weights_mb']:.0f} MB of fp32 weights stream them at "
            f"{t1['gb_s']:.1f} GB/s on one thread and {t2['gb_s']:.1f} on two, a ceiling of {t1['tok_s_ceiling']:.0f}"
            f"-{t2['tok_s_ceiling']:.0f} tokens/s before any other work of a step: batch-1 fp32 decode here is "
            f"memory-bound{llama}. With the weights in cache, "
            f"PyTorch's int8 weight-only kernel runs the layers' products at {int8_layers:.2f}x fp32's speed (the "
            f"LM head {head['int8_weight_only_bf16_over_fp32']:.2f}x): on a CPU without bfloat16 or VNNI "
            f"instructions it saves memory traffic, not arithmetic.{ao} llama.cpp's q8_0 also quantizes the "
            f"activations and runs hand-written integer SIMD dot products, which no library kernel here offers.\n")


def _blocks() -> list[tuple[Path, str, Callable[[], str]]]:
    results, soak, engine, budget = load(RESULTS), load(SOAK), load(ENGINE), load(BUDGET)
    first_token, docker_e2e = load(FIRST_TOKEN), load(DOCKER_E2E)
    blocks: list[tuple[Path, str, Callable[[], str]]] = [
        (RELIABILITY, "soak", lambda: soak_section(soak)),
        (README, "first-token", lambda: first_token_section(first_token)),
        (README, "docker-e2e", lambda: docker_e2e_section(docker_e2e)),
    ]
    if budget is not None:
        blocks.append((README, "budget", lambda: readme_budget(budget)))
    if results is not None:
        blocks.append((README, "performance", lambda: readme_performance(results, soak)))
    if engine is not None:
        blocks.append((README, "engine", lambda: readme_engine(engine)))
    nchoices = load(NCHOICES)
    if nchoices is not None:
        blocks.append((README, "nchoices", lambda: readme_nchoices(nchoices)))
    gqa, lora = load(GQA), load(LORA)
    if gqa is not None and lora is not None:
        blocks.append((README, "llama", lambda: readme_llama(gqa, lora)))
    logprobs = load(LOGPROBS)
    if logprobs is not None:
        blocks.append((README, "logprobs", lambda: readme_logprobs(logprobs)))
    structured = load(STRUCTURED)
    if structured is not None:
        blocks += [(README, "structured", lambda: structured_engine(structured)),
                   (STRUCTURED_DOC, "structured", lambda: structured_engine(structured, STRUCTURED_DOC.parent)),
                   (STRUCTURED_DOC, "structured-libraries", lambda: structured_libraries(structured))]
    int8 = load(INT8)
    if int8 is not None:
        blocks.append((README, "int8", lambda: readme_int8(int8)))
    kernels = load(KERNELS)
    if kernels is not None:
        blocks.append((README, "kernels", lambda: readme_kernels(kernels, int8)))
    return blocks


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the block NAME's body replaced; ValueError if the markers are missing."""
    pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(?=^<!-- /bench:{re.escape(name)} -->$)",
                         re.S | re.M)
    if not pattern.search(text):
        raise ValueError(f"no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n", text, count=1)


def stale_blocks() -> list[str]:
    """`path: name` of every block whose text is not what the result files give."""
    stale = []
    for path, name, render in _blocks():
        text = path.read_text(encoding="utf-8")
        if replace_block(text, name, render()) != text:
            stale.append(f"{rel(path)}: {name}")
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report blocks that differ; exit 1 if any")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_blocks()
        for s in stale:
            print(f"stale: {s} (run python -m bench.figures)")
        return 1 if stale else 0
    for path, name, render in _blocks():
        path.write_text(replace_block(path.read_text(encoding="utf-8"), name, render()), encoding="utf-8")
        print(f"wrote {rel(path)}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
