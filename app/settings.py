"""Server settings: one pydantic-settings object, read from `POCKETGPT_*` environment variables.

CLI flags (`pocketgpt serve --port ...`) are passed as init arguments, which take priority over the
environment. Nothing here is read at import time: `Settings()` reads the environment when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class Settings(BaseSettings):
    """Everything the inference server can be configured with (env prefix `POCKETGPT_`)."""

    model_config = SettingsConfigDict(env_prefix="POCKETGPT_", extra="ignore")

    # -- model ---------------------------------------------------------------------------------
    checkpoint: Path | None = Field(None, description="checkpoint directory to serve")
    model_name: str | None = Field(None, description="name reported as `model`; default: checkpoint dir name")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps")
    dtype: str = Field("auto", description="auto (bf16 on cuda, fp32 elsewhere), float32, bfloat16, float16")
    # model.quantize.QUANTIZE_MODES; a Literal keeps this module torch-free and names the choices in errors.
    quantize: Literal["none", "int8"] = Field("none", description="none, or int8: weight-only int8 Linear layers "
                                              "(per-channel scales; faster decode, ~1/4 of their memory, "
                                              "slightly different outputs)")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads for the model (default: the "
                                "cores this process may use, less one for the event loop; at least 1)")
    compile: bool = Field(False, description="CPU: compile the decode step with torch.compile (needs a C++ "
                          "compiler; ~30 s more per model load, faster batch-1 decode; see README)")

    # -- network -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # Slow and numerous clients (passed to uvicorn by `pocketgpt serve`, see app/server.py).
    max_connections: int = Field(512, ge=1, description="open connections (and requests) at once; beyond it new "
                                 "requests get 503 (uvicorn's limit_concurrency)")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's headers; "
                                  "then the connection is closed")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client has to send a request body (408 after); "
                                "for dataset uploads, the most seconds between two chunks")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle kept-alive connection stays open")

    # -- engine and limits ---------------------------------------------------------------------
    max_running: int = Field(16, ge=1, description="KV-cache slots: requests decoded together")
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot before 429")
    max_new_tokens: int = Field(1024, ge=1, description="upper bound for a request's max_new_tokens")
    max_prompt_chars: int = Field(32_000, ge=1, description="upper bound for a prompt's length in characters "
                                  "(for chat: the messages' content together)")
    max_messages: int = Field(256, ge=1, le=2048, description="upper bound for a chat request's number of messages")
    max_schema_bytes: int = Field(16_384, ge=1, description="upper bound for a structured-output constraint: a "
                                  "JSON schema (as compact JSON), a regex or a grammar, in bytes")
    max_n: int = Field(8, ge=1, le=128, description="upper bound for a request's `n`: choices sampled from one "
                       "prefill, each holding a KV slot (so n is also bounded by max_running)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="request body limit (413 beyond)")
    request_timeout: float = Field(300.0, gt=0, description="seconds from admission to the last token")
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens prefilled per engine step")
    prefix_cache_slots: float = Field(2.0, ge=0, description="room for shared prompt prefixes' keys and values, "
                                      "in KV slots' worth of tokens (each a full context); 0 turns it off")
    speculative_tokens: int = Field(0, ge=0, le=16, description="n-gram speculative decoding for "
                                    "unpenalized requests, greedy or sampled (outputs unchanged): the longest "
                                    "draft verified per step (0: off)")
    retry_after: int = Field(1, ge=0, description="Retry-After seconds sent with 429")
    sse_ping: float = Field(15.0, ge=0, description="seconds between SSE keep-alive comments (0: off)")
    shutdown_grace_s: float = Field(3.0, ge=0, description="seconds requests in flight get to finish after "
                                    "SIGTERM/SIGINT; then each still running ends with 503 server_shutting_down "
                                    "(a stream: an error event)")

    # -- auth ----------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys for /v1 and /info; empty: open",
        repr=False,  # secrets: never in a repr or a log line (admin_token is a SecretStr)
    )
    admin_token: SecretStr | None = Field(None, description="bearer token for the admin API")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS; empty: no CORS headers at all"
    )

    # -- admin API (declared here so every part of the app reads one object) ------------------
    data_dir: Path = Field(Path("data"), description="datasets for training jobs")
    checkpoint_dir: Path = Field(Path("checkpoints"), description="where training jobs write checkpoints")
    db: Path = Field(Path("pocketgpt.db"), description="SQLite file for the job store")
    max_upload_bytes: int = Field(200_000_000, ge=1, description="dataset upload limit (the admin route "
                                  "enforces it; max_body_bytes does not apply under /admin/datasets)")
    max_concurrent_jobs: int = Field(1, ge=1, description="training jobs running at once; the rest queue (FIFO)")
    cancel_grace_s: float = Field(30.0, gt=0, description="seconds a cancelled (or, at shutdown, stopped) "
                                  "training job gets to save and exit after SIGTERM before SIGKILL")

    # -- Ray (optional extra; README "Scaling out") ----------------------------------------------
    ray_jobs_address: str | None = Field(None, description="a Ray cluster's job API (http://HEAD:8265): admin-API "
                                         "training jobs run there as Ray jobs instead of local processes")
    ray_job_gpus: float = Field(0, ge=0, description="GPUs Ray reserves for each training job")
    ray_train_workers: int = Field(0, ge=0, le=1024, description="with ray_jobs_address: 0 runs each job as one "
                                   "trainer process; N runs it under Ray Train (TorchTrainer) as N DDP workers, "
                                   "one GPU each where the cluster has GPUs (training/ray_train.py)")
    ray_serve_address: str | None = Field(None, description="the Ray cluster (GCS address) of a `pocketgpt serve "
                                          "--ray` deployment: this admin server's model swaps and serve_when_done "
                                          "swap its replicas")

    log_level: str = Field("info", description="level of the pocketgpt loggers")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        # The environment gives one string; a comma-separated list is easier to write than JSON.
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES} (cuda:N allowed), got {value!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {value!r}")
        return value

    @property
    def n_limit(self) -> int:
        """The largest `n` a request may ask for: its choices are decoded together, each in a KV slot."""
        return min(self.max_n, self.max_running)

    def limits(self) -> dict[str, Any]:
        """The request limits, as reported by GET /info."""
        return {
            "max_running": self.max_running,
            "max_queue": self.max_queue,
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_chars": self.max_prompt_chars,
            "max_messages": self.max_messages,
            "max_schema_bytes": self.max_schema_bytes,
            "max_n": self.max_n,
            "max_body_bytes": self.max_body_bytes,
            "request_timeout": self.request_timeout,
            "prefill_chunk": self.prefill_chunk,
        }
