"""Prometheus metrics. Each app instance owns its own CollectorRegistry, so tests can build many apps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from pocketgpt.app.engine.holder import EngineHolder

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the server exports, all named `pocketgpt_*`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pocketgpt_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "pocketgpt_request_duration_seconds", "HTTP request duration, streams until their last byte",
            ["route"], buckets=_DURATION_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "pocketgpt_time_to_first_token_seconds", "Time from admission to the first sampled token",
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "pocketgpt_inter_token_latency_seconds", "Time between consecutive tokens of one request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("pocketgpt_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.prefill_tokens = Counter(
            "pocketgpt_prefill_tokens", "Prompt tokens run through the model (not those from the prefix cache; "
            "a request's n choices share one prefill)", registry=r,
        )
        self.generated_tokens = Counter("pocketgpt_generated_tokens", "Tokens sampled", registry=r)
        self.finished = Counter(
            "pocketgpt_generations_finished", "Generations ended, by reason "
            "(eos, stop_sequence, length, cancelled, request_timeout, engine_stopped, engine_error)",
            ["reason"], registry=r,
        )
        for reason in ("eos", "stop_sequence", "length", "cancelled", "request_timeout"):
            self.finished.labels(reason=reason)  # export zeros so rates and alerts work from the start
        self.rejected = Counter(
            "pocketgpt_requests_rejected", "Generations refused at admission, by reason", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "pocketgpt_batch_size", "Rows sampled per engine step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.running = Gauge("pocketgpt_requests_running", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge("pocketgpt_requests_waiting", "Requests admitted and waiting for a slot", registry=r)
        self.kv_slots = Gauge("pocketgpt_kv_slots_in_use", "KV-cache slots in use", registry=r)
        self.kv_slots_total = Gauge("pocketgpt_kv_slots_total", "KV-cache slots of the current model", registry=r)
        self.prefix_hit_tokens = Counter(
            "pocketgpt_prefix_cache_hit_tokens", "Prompt tokens whose keys came from the prefix cache", registry=r
        )
        self.prefix_query_tokens = Counter(
            "pocketgpt_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_usage = Gauge(
            "pocketgpt_prefix_cache_usage_ratio", "Fraction of the prefix cache's blocks in use", registry=r
        )
        self.spec_draft_tokens = Counter(
            "pocketgpt_spec_draft_tokens", "Speculative draft tokens verified", registry=r
        )
        self.spec_accepted_tokens = Counter(
            "pocketgpt_spec_accepted_tokens", "Speculative draft tokens accepted", registry=r
        )
        self.model_loaded = Gauge("pocketgpt_model_loaded", "1 when a model is serving", registry=r)

    def bind(self, holder: EngineHolder) -> None:
        """Read the gauges from the engines at scrape time (summed over a swap's old and new engine)."""
        self.running.set_function(lambda: sum(e.running for e in holder.engines))
        self.waiting.set_function(lambda: sum(e.waiting for e in holder.engines))
        self.kv_slots.set_function(lambda: sum(e.running for e in holder.engines))
        self.kv_slots_total.set_function(lambda: holder.current.max_running if holder.current else 0)
        self.model_loaded.set_function(lambda: 1 if holder.current is not None else 0)
        self.prefix_usage.set_function(lambda: holder.current.prefix_cache_usage if holder.current else 0.0)

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        return generate_latest(self.registry)
