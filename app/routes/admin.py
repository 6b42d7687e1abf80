"""The admin API under /admin: training jobs, datasets, checkpoints and the served model.

Every route needs `Authorization: Bearer <POCKETGPT_ADMIN_TOKEN>` (inference API keys do not count). With no
admin token configured the whole API answers 403, saying how to enable it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from pocketgpt.app.errors import APIError
from pocketgpt.app.jobs.checkpoints import list_checkpoints
from pocketgpt.app.jobs.datasets import (
    DATASET_ID,
    DataPathError,
    UploadInvalid,
    UploadTooLarge,
    check_links,
    resolve_checkpoint_name,
    resolve_data_source,
    save_upload,
)
from pocketgpt.app.jobs.events import job_events, job_view
from pocketgpt.app.jobs.manager import JobConflict, JobManager, JobNotFound
from pocketgpt.app.jobs.process import tail_lines
from pocketgpt.app.jobs.schemas import ConfigProblem, JobRequest, ModelSwapRequest
from pocketgpt.app.jobs.store import LIVE_STATUSES, TERMINAL_STATUSES
from pocketgpt.model.checkpoint import CheckpointError

log = logging.getLogger("pocketgpt.admin")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pocketgpt-admin"'}


def _secret(value: Any) -> str:
    if value is None:
        return ""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)


def require_admin(request: Request) -> None:
    """Check the bearer token against the admin token in constant time."""
    expected = _secret(request.app.state.settings.admin_token)
    if not expected:
        raise APIError(403, "The admin API is disabled. Set POCKETGPT_ADMIN_TOKEN to a secret to enable it, "
                       "then send it as `Authorization: Bearer <token>`.", code="admin_disabled")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing admin token: send `Authorization: Bearer <POCKETGPT_ADMIN_TOKEN>`.",
                       code="missing_admin_token", headers=_CHALLENGE)
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "Invalid admin token (inference API keys do not grant admin access).",
                       code="invalid_admin_token", headers=_CHALLENGE)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def get_manager(request: Request) -> JobManager:
    return request.app.state.job_manager


def _job_or_404(manager: JobManager, job_id: str):
    try:
        return manager.get(job_id)
    except JobNotFound:
        raise APIError(404, f"No job with id {job_id!r}.", param="id", code="job_not_found") from None


def _job_response(job, status_code: int) -> JSONResponse:
    view = job_view(job)
    return JSONResponse(view, status_code=status_code, headers={"Location": view["url"]})


# -- jobs ---------------------------------------------------------------------------------------------------
@router.post("/jobs", status_code=202)
async def create_job(body: JobRequest, request: Request, manager: JobManager = Depends(get_manager)):
    """Queue a training job; answers 202 with the job and its URL (also in `Location`)."""
    data_dir = request.app.state.settings.data_dir
    try:  # in a thread: a data folder is walked for symlinks that leave the data root
        data = await asyncio.to_thread(lambda: [resolve_data_source(s, manager.store, data_dir) for s in body.data])
    except DataPathError as e:
        raise APIError(422, str(e), param="data", code="invalid_data") from None
    init_from = None
    if body.init_from is not None:
        init_from = str(_checkpoint_dir(manager, body.init_from, param="init_from", missing_status=422))
    try:
        args = body.trainer_args(data, init_from)
    except ConfigProblem as e:
        raise APIError(422, str(e), param=e.param, code="invalid_value") from None
    job = manager.submit(body.model_dump(exclude_none=True), args, name=body.name,
                         serve_when_done=body.serve_when_done)
    return _job_response(job, 202)


@router.get("/jobs")
async def list_jobs(
    status: str | None = Query(None, pattern="^(" + "|".join(LIVE_STATUSES + TERMINAL_STATUSES) + ")$"),
    limit: int = Query(100, ge=1, le=1000),
    manager: JobManager = Depends(get_manager),
):
    """Jobs, newest first."""
    return {"object": "list", "data": [job_view(j) for j in manager.store.list_jobs(status, limit)]}


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, manager: JobManager = Depends(get_manager)):
    """One job: status, step / total, losses, tokens/s, ETA, checkpoints, error."""
    return job_view(_job_or_404(manager, job_id))


# ASCII digits only: str.isdigit() also accepts "²", which int() then refuses (that was a 500).
_EVENT_ID = r"^[0-9]{1,18}$"


@router.get("/jobs/{job_id}/events")
async def job_event_stream(
    job_id: str, request: Request, manager: JobManager = Depends(get_manager),
    last_event_id: str | None = Header(None, alias="Last-Event-ID", pattern=_EVENT_ID,
                                       description="resume after this event id (sent by EventSource on reconnect)"),
):
    """SSE: the job's metrics records so far and as they come (event = record type), then `status`."""
    _job_or_404(manager, job_id)
    drain = request.app.state.drain
    return drain.sse(job_events(manager, job_id, int(last_event_id or 0), stopping=lambda: drain.draining),
                     ping=request.app.state.settings.sse_ping)


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
async def job_logs(job_id: str, tail: int = Query(200, ge=1, le=100_000),
                   manager: JobManager = Depends(get_manager)):
    """The last `tail` lines of the trainer's combined stdout/stderr."""
    job = _job_or_404(manager, job_id)
    text = await asyncio.to_thread(tail_lines, manager.log_path(job), tail, 16 * 1024 * 1024)
    return PlainTextResponse(text)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, manager: JobManager = Depends(get_manager)):
    """Cancel a queued job, or stop a running one (it saves `last/` first)."""
    _job_or_404(manager, job_id)
    try:
        return job_view(manager.cancel(job_id))
    except JobConflict as e:
        raise APIError(409, str(e), code="job_not_cancellable") from None


@router.post("/jobs/{job_id}/resume", status_code=202)
async def resume_job(job_id: str, manager: JobManager = Depends(get_manager)):
    """Queue an interrupted or cancelled job again, continuing from its last checkpoint."""
    _job_or_404(manager, job_id)
    try:
        return _job_response(manager.resume(job_id), 202)
    except JobConflict as e:
        raise APIError(409, str(e), code="job_not_resumable") from None


# -- datasets -----------------------------------------------------------------------------------------------
_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}}}}}}}


@router.post("/datasets", status_code=201, openapi_extra=_UPLOAD_SCHEMA)
async def upload_dataset(request: Request, manager: JobManager = Depends(get_manager)):
    """Upload a text corpus (multipart field `file`), streamed to disk; 413 past POCKETGPT_MAX_UPLOAD_BYTES."""
    settings = request.app.state.settings
    try:
        ds = await save_upload(dict(request.headers), request.stream(), manager.store, settings.data_dir,
                               settings.max_upload_bytes)
    except UploadTooLarge as e:
        raise APIError(413, str(e), param="file", code="upload_too_large") from None
    except UploadInvalid as e:
        raise APIError(422 if e.param else 400, str(e), param=e.param, code=e.code) from None
    return JSONResponse({"object": "dataset", **ds.to_dict()}, status_code=201,
                        headers={"Location": f"/admin/datasets/{ds.id}"})


@router.get("/datasets")
async def list_datasets(manager: JobManager = Depends(get_manager)):
    """Uploaded datasets, newest first."""
    return {"object": "list", "data": [{"object": "dataset", **d.to_dict()} for d in manager.store.list_datasets()]}


@router.get("/datasets/{dataset_id}")
async def get_dataset(dataset_id: str, manager: JobManager = Depends(get_manager)):
    """One uploaded dataset."""
    ds = manager.store.get_dataset(dataset_id) if DATASET_ID.match(dataset_id) else None
    if ds is None:
        raise APIError(404, f"No dataset with id {dataset_id!r}.", param="id", code="dataset_not_found")
    return {"object": "dataset", **ds.to_dict()}


# -- checkpoints and the served model -----------------------------------------------------------------------
def _checkpoint_dir(manager: JobManager, name: str, param: str, missing_status: int = 404):
    """A checkpoint directory from a name under the checkpoint root, or a job id (its best, else last); refused
    (422) when it holds a symlink leaving the root."""
    job = manager.store.get_job(name)
    try:
        if job is None:
            return resolve_checkpoint_name(name, manager.checkpoint_dir)
        path = manager.checkpoint_path(job)
        if path is None:
            raise APIError(missing_status, f"Job {name!r} has no checkpoint yet.", param=param,
                           code="checkpoint_not_found")
        check_links(path, manager.checkpoint_dir, f"checkpoint {name!r}")
        return path
    except DataPathError as e:
        status = missing_status if e.missing else 422
        raise APIError(status, str(e), param=param, code="invalid_checkpoint") from None


@router.get("/checkpoints")
async def checkpoints(request: Request, manager: JobManager = Depends(get_manager)):
    """Every checkpoint under the checkpoint root: step, val loss, params, size, created, writing job."""
    job_ids = {j.id for j in manager.store.list_jobs()}
    items = list_checkpoints(manager.checkpoint_dir, job_ids)
    served = _served_path(request)
    for item in items:
        item["serving"] = served is not None and item["path"] == served
    return {"object": "list", "data": items}


def _served_path(request: Request) -> str | None:
    holder = getattr(request.app.state, "holder", None)
    engine = getattr(holder, "current", None)
    path = getattr(engine, "path", None)
    return str(Path(path).resolve()) if path else None


@router.get("/model")
async def served_model(request: Request, manager: JobManager = Depends(get_manager)):
    """The checkpoint being served (null when no model is loaded)."""
    path = _served_path(request)
    return {"object": "model", "checkpoint": manager.checkpoint_name(path) if path else None, "path": path}


@router.post("/model")
async def swap_model(body: ModelSwapRequest, request: Request, manager: JobManager = Depends(get_manager)):
    """Hot-load a checkpoint. Answers once new requests go to it (the old model finishes its requests in the
    background); on failure the current model keeps serving and the reason is returned (422)."""
    path = _checkpoint_dir(manager, body.checkpoint, param="checkpoint")
    swap_all = getattr(request.app.state, "swap_all_replicas", None)
    if swap_all is not None:  # Ray Serve (app/ray_serve.py): answer once every replica serves it
        return await _swap_all_replicas(swap_all, path, body.checkpoint, manager)
    holder = request.app.state.holder
    before = holder.current
    swap = asyncio.ensure_future(holder.swap(path))
    _swaps.add(swap)
    swap.add_done_callback(_swap_done)
    while not swap.done() and holder.current is before:
        await asyncio.sleep(0.01)
    if swap.done() and swap.exception() is not None:  # a load failure: the old engine is still in place
        raise APIError(422, f"Could not load checkpoint {body.checkpoint!r}: {swap.exception()}",
                       param="checkpoint", code="checkpoint_load_failed")
    manager.record_served(path)  # served again after a restart
    return {"object": "model", "checkpoint": manager.checkpoint_name(path), "path": str(path),
            "draining": not swap.done()}


async def _swap_all_replicas(swap_all, path: Path, name: str, manager: JobManager) -> dict[str, Any]:
    try:
        await swap_all(path)
    except CheckpointError as e:  # raised by this replica's load, before any other replica was touched
        raise APIError(422, f"Could not load checkpoint {name!r}: {e}", param="checkpoint",
                       code="checkpoint_load_failed") from None
    except (RuntimeError, TimeoutError) as e:
        raise APIError(502, f"Not every replica serves {name!r}: {e}", code="replicas_not_swapped") from None
    manager.record_served(path)  # served again after a restart
    return {"object": "model", "checkpoint": manager.checkpoint_name(path), "path": str(path), "draining": False,
            "replicas": "all"}


_swaps: set[asyncio.Future] = set()  # swaps still draining the previous engine; referenced so they finish


def _swap_done(task: asyncio.Future) -> None:
    _swaps.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("model swap failed: %s", task.exception())
