"""The hpcai client's REST endpoints: training runs, checkpoints, deletion, archive downloads.

hpcai names a checkpoint ``hpcai://<run>/<training|sampler>/<name>`` and lists it with
``checkpoint_id`` = the name and ``checkpoint_path``; it knows no exported (external)
checkpoints, so its listings leave them out. Its deletes and downloads address a checkpoint by
name alone (``<run>/checkpoints/<name>``, ``<type>/<name>`` is accepted too): a delete removes
every checkpoint of that name in the run, a download takes the sampler weights before the
training state. A download is the checkpoint's PEFT adapter as ``.tar.gz``, exported by the
scheduler once per saved version; the request holds until it is written (or answers 408, which
the client retries).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from sqlalchemy.engine import Row
from starlette.concurrency import run_in_threadpool

from trainers.service import api_rest, api_session, ckpt_files, paths
from trainers.service.api_hpcai import DIALECT, FinalRoute
from trainers.service.api_training import Who, own_model, service_of
from trainers.service.auth import Caller
from trainers.service.dialect import HPCAI_DIALECT, HPCAI_PREFIX
from trainers.service.service import Service, canonical
from trainers.service.store import Submission

router = APIRouter(prefix=HPCAI_PREFIX + "/api/v1", route_class=FinalRoute)
KINDS = ("sampler", "training")  # hpcai's checkpoint types, in the order a download prefers


def checkpoint_json(row: Row) -> dict:
    uri = paths.TinkerPath(row.model_id, row.kind, row.name).uri(HPCAI_DIALECT.scheme)
    return {**api_rest.checkpoint_json(row), "checkpoint_id": row.name, "checkpoint_path": uri}


@router.get("/training_runs")
def list_training_runs(request: Request, who: Who, limit: int = 20, offset: int = 0) -> dict:
    return api_rest.training_runs(service_of(request), who, limit, offset, checkpoint_json)


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, request: Request, who: Who) -> dict:
    svc = service_of(request)
    return api_rest.run_json(svc, who, own_model(svc, who, run_id), checkpoint_json)


@router.get("/training_runs/{run_id}/checkpoints")
@router.get("/models/{run_id}/checkpoints")
def list_checkpoints(run_id: str, request: Request, who: Who) -> dict:
    svc = service_of(request)
    own_model(svc, who, run_id)
    rows, _ = svc.store.list_checkpoints(who.key_id, run_id)
    return {"checkpoints": [checkpoint_json(r) for r in rows if r.kind in KINDS]}


def _named(svc: Service, who: Caller, run_id: str, checkpoint_id: str) -> list[Row]:
    """The caller's checkpoints ``checkpoint_id`` (``name`` or ``<type>/<name>``) of the run."""
    kind, _, name = checkpoint_id.rpartition("/")
    if kind and kind not in KINDS:
        raise HTTPException(400, f"checkpoint_id: {checkpoint_id!r} must be NAME or <{'|'.join(KINDS)}>/NAME")
    try:
        paths.check_name(name, "checkpoint_id")
    except paths.PathError as err:
        raise HTTPException(400, str(err)) from None
    rows = [svc.store.checkpoint(who.key_id, run_id, k, name) for k in ((kind,) if kind else KINDS)]
    rows = [r for r in rows if r is not None and r.key_id == who.key_id]
    if not rows:
        raise HTTPException(404, f"checkpoint_id: no checkpoint {checkpoint_id!r} in {run_id!r}")
    return rows


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request, who: Who) -> None:
    svc = service_of(request)
    for row in _named(svc, who, run_id, checkpoint_id):
        api_rest.remove_checkpoint(svc, row)


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
async def download_archive(run_id: str, checkpoint_id: str, request: Request, who: Who) -> FileResponse:
    svc = service_of(request)
    row = (await run_in_threadpool(_named, svc, who, run_id, checkpoint_id))[0]
    version = ckpt_files.current(Path(row.directory))
    archive = ckpt_files.archive_path(version)
    if not archive.is_file():
        key = "export:" + hashlib.sha256(str(version).encode()).hexdigest()[:40]
        sub = Submission(who.key_id, "export", canonical({"dir": str(version)}), idempotency_key=key, dialect=DIALECT)
        done = await api_session.wait_for(svc, who, await run_in_threadpool(svc.submit, who, sub))
        if done.status == "failed":
            raise HTTPException(400 if done.category == "user" else 500, f"export failed: {done.error}")
        if done.status != "done":
            raise HTTPException(408, "the archive is being written: retry")
    return FileResponse(archive, media_type="application/gzip", filename=f"{row.name}.tar.gz")
