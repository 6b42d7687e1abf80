"""The plots of docs/benchmarks.md, from the results of one `python -m bench` run (matplotlib: the bench extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.figures import NANOGPT_TARGET_BPB

NAMES = ("decode", "serve_throughput", "serve_latency", "train")


def existing_plots(folder: Path) -> dict[str, Path]:
    """The plots already in `folder` (re-rendering the text from the results that drew them)."""
    return {name: folder / f"{name}.png" for name in NAMES if (folder / f"{name}.png").is_file()}


def make_plots(results: dict[str, Any], folder: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    sec = results["sections"]
    out: dict[str, Path] = {}

    if "decode" in sec:
        tok = sec["decode"]["tok_s"]
        labels = {"bare_static_kv": "bare loop", "engine": "engine", "http_sse": "HTTP+SSE",
                  "transformers": "transformers", "naive_recompute": "recompute"}
        keys = [k for k in labels if k in tok]
        med = [tok[k]["median"] for k in keys]
        err = [[tok[k]["median"] - tok[k]["min"] for k in keys], [tok[k]["max"] - tok[k]["median"] for k in keys]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar([labels[k] for k in keys], med, yerr=err, capsize=4, color="#4c72b0")
        floor = sec["decode"]["floor"].get("floor_tok_s")
        if floor:
            ax.axhline(floor, color="#c44e52", ls="--", lw=1)
            ax.text(len(keys) - 0.5, floor, " bandwidth floor", color="#c44e52", va="bottom", ha="right")
        ax.set_ylabel("tokens/s (median, min–max)")
        ax.set_title("One stream, greedy decode")
        fig.tight_layout()
        out["decode"] = folder / "decode.png"
        fig.savefig(out["decode"], dpi=110)
        plt.close(fig)

    if "serve" in sec:
        lv = sec["serve"]["levels"]
        cs = [x["concurrency"] for x in lv]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for key, label, color in (("aggregate_tok_s", "pocketgpt over HTTP+SSE", "#4c72b0"),
                                  ("bare_tok_s", "bare loop, same batch", "#999999")):
            med = [x[key]["median"] for x in lv]
            ax.errorbar(cs, med, yerr=[[m - x[key]["min"] for m, x in zip(med, lv, strict=True)],
                                       [x[key]["max"] - m for m, x in zip(med, lv, strict=True)]],
                        marker="o", capsize=3, label=label, color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("tokens/s")
        ax.set_title("Throughput against concurrency")
        ax.legend()
        fig.tight_layout()
        out["serve_throughput"] = folder / "serve_throughput.png"
        fig.savefig(out["serve_throughput"], dpi=110)
        plt.close(fig)

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        qs = list(range(0, 101, 5))
        for x in lv:
            a1.plot(x["itl_quantiles_ms"], qs, label=f"{x['concurrency']} streams")
            a2.plot(x["ttft_quantiles_ms"], qs, label=f"{x['concurrency']} streams")
        inter = sec["serve"].get("interference")
        a1.set_xscale("log")
        a2.set_xscale("log")
        a1.set_xlabel("inter-token latency, ms")
        a2.set_xlabel("time to first token, ms")
        a1.set_ylabel("percentile")
        a1.set_title("Inter-token latency (CDF)")
        a2.set_title("Time to first token (CDF)")
        a1.legend(fontsize=8)
        if inter:
            a1.text(0.02, 0.02, f"512-token prompt during 16 streams: p99 x{inter['p99_ratio']['median']:.2f}",
                    transform=a1.transAxes, fontsize=8)
        fig.tight_layout()
        out["serve_latency"] = folder / "serve_latency.png"
        fig.savefig(out["serve_latency"], dpi=110)
        plt.close(fig)

    if "train" in sec and "quality" in sec["train"]:
        q = sec["train"]["quality"]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for key, label in (("ours", "pocketgpt trainer"), ("nanogpt", "nanoGPT-style loop")):
            curve = q[key].get("curve") or []
            if curve:
                ax.plot([c["elapsed_s"] for c in curve], [c["val_bpb"] for c in curve], marker=".", label=label)
        ax.axhline(NANOGPT_TARGET_BPB, color="#c44e52", ls="--", lw=1,
                   label=f"{NANOGPT_TARGET_BPB:.2f}: nanoGPT's published figure (not this run)")
        ax.set_xlabel("wall time, s")
        ax.set_ylabel("validation bits per byte")
        ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
        ax.set_title("Training on Tiny Shakespeare (2 cores)")
        ax.legend()
        fig.tight_layout()
        out["train"] = folder / "train.png"
        fig.savefig(out["train"], dpi=110)
        plt.close(fig)
    return out
