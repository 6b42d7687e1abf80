"""The figures README.md and docs/ quote are generated from the bench's result files, not typed by hand.

A stale or hand-edited figure fails here: the committed text must equal what bench/figures.py and
bench/report.py render from the committed docs/benchmarks/*.json.
"""

from __future__ import annotations

import json
import re

from bench import figures, report
from bench.plots import existing_plots

DOCS = figures.ROOT / "docs"

# Figures typed into prose: decimals, ratios, timings and rates. Config words ("4 layers", "1024-token") pass.
TYPED_FIGURE = re.compile(r"\d+\.\d+|\b\d[\d,]*(?:\.\d+)?x\b|\b\d[\d,]*\s*(?:ms|µs|s\b|tokens/s|tok/s|GB/s|MiB|%)")


def test_readme_and_reliability_quote_the_result_files() -> None:
    assert figures.stale_blocks() == [], "run `python -m bench.figures` after a bench run, and commit both"


def test_benchmarks_page_is_the_render_of_its_results_file() -> None:
    results = json.loads(figures.RESULTS.read_text())
    rendered = report.render(results, DOCS, figures.RESULTS, existing_plots(DOCS / "benchmarks"))
    assert (DOCS / "benchmarks.md").read_text() == rendered, "run `python -m bench.report` and commit the page"


def test_analysis_template_has_no_typed_figures_and_every_placeholder_is_measured() -> None:
    template = report.ANALYSIS.read_text()
    prose = re.sub(r"\{[a-z0-9_]+\}", "", re.sub(r"<!--.*?-->", "", template, flags=re.S))
    assert TYPED_FIGURE.findall(prose) == [], "put figures in bench/figures.py analysis_values, not the prose"
    results = json.loads(figures.RESULTS.read_text())
    text = report.analysis(results, figures.RESULTS)
    assert "(not measured:" not in text and "{" not in text


def test_typed_figure_pattern_catches_the_old_hand_typed_ratios() -> None:
    """The lint above would have caught what issue 13 found in the old analysis text."""
    for typed in ("140 | 194 | 1.54x", "2,135 | 2,131 | 1.06x (noise)", "(2.72 bits per byte after about 130 s)",
                  "697 → 376 µs", "27 ms"):
        assert TYPED_FIGURE.search(typed), typed


def test_ratios_are_computed_from_the_results() -> None:
    """A ratio in the README is the bench's own round-by-round median, so changing the results changes the text."""
    results = json.loads(figures.RESULTS.read_text())
    ratio = results["sections"]["decode"]["ratios"]["engine/transformers"]["median"]
    assert f"({ratio:.2f}x)" in figures.readme_performance(results, None)
    results["sections"]["decode"]["ratios"]["engine/transformers"]["median"] = 9.87
    assert "(9.87x)" in figures.readme_performance(results, None)
