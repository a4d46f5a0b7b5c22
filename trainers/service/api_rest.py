"""REST endpoints: training runs, checkpoints, weights info, capabilities, downloads, usage.

Downloads of exported (PEFT) checkpoints use URLs that carry a random token valid for
``ttl.download_url_s`` (the cookbook fetches them without the API key); they point at this
server.
"""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.engine import Row

from trainers.service import ckpt_files, paths
from trainers.service.api_models import TtlBody, WeightsInfoBody
from trainers.service.api_training import Who, own_model, resolve_checkpoint, service_of
from trainers.service.db import downloads
from trainers.service.metering import usage_report

router = APIRouter(prefix="/api/v1")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


def checkpoint_json(row: Row) -> dict:
    path = paths.TinkerPath(row.model_id, row.kind, row.name)
    return {"checkpoint_id": path.checkpoint_id, "checkpoint_type": row.kind, "time": _iso(row.created_at),
            "tinker_path": str(path), "size_bytes": row.size_bytes, "public": bool(row.public),
            "user_metadata": row.user_metadata, "expires_at": _iso(row.expires_at)}


def run_json(svc, who, model: Row, ckpt_json: Callable[[Row], dict] = checkpoint_json) -> dict:
    """A training run, its newest checkpoints written by ``ckpt_json`` (the client's form)."""
    ckpts, _ = svc.store.list_checkpoints(who.key_id, model.id)
    last = {kind: next((ckpt_json(c) for c in reversed(ckpts) if c.kind == kind), None)
            for kind in ("training", "sampler")}
    meta = {str(k): str(v) for k, v in (model.user_metadata or {}).items()}
    return {"training_run_id": model.id, "base_model": model.base_model, "model_owner": who.name, "is_lora": True,
            "corrupted": False, "lora_rank": model.lora["rank"], "last_request_time": _iso(model.last_request_at),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"], "user_metadata": meta}


def _cursor(limit: int, offset: int, total: int) -> dict:
    return {"limit": limit, "offset": offset, "total_count": total}


@router.get("/get_server_capabilities")
def get_server_capabilities(request: Request, who: Who) -> dict:
    return {"supported_models": [{"model_name": m.name, "max_context_length": m.max_context_length,
                                  "trainable": True, "sampleable": True}
                                 for m in service_of(request).models.values()]}


def training_runs(svc, who, limit: int, offset: int, ckpt_json: Callable[[Row], dict] = checkpoint_json) -> dict:
    rows, total = svc.store.list_models(who.key_id, max(0, min(limit, 1000)), max(0, offset))
    return {"training_runs": [run_json(svc, who, m, ckpt_json) for m in rows], "cursor": _cursor(limit, offset, total)}


@router.get("/training_runs")
def list_training_runs(request: Request, who: Who, limit: int = 20, offset: int = 0) -> dict:
    return training_runs(service_of(request), who, limit, offset)


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, request: Request, who: Who) -> dict:
    svc = service_of(request)
    return run_json(svc, who, own_model(svc, who, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, request: Request, who: Who) -> dict:
    svc = service_of(request)
    own_model(svc, who, run_id)
    rows, _ = svc.store.list_checkpoints(who.key_id, run_id)
    return {"checkpoints": [checkpoint_json(r) for r in rows]}


@router.get("/checkpoints")
def list_user_checkpoints(request: Request, who: Who, limit: int = 100, offset: int = 0) -> dict:
    rows, total = service_of(request).store.list_checkpoints(who.key_id, None, max(0, min(limit, 1000)),
                                                             max(0, offset))
    return {"checkpoints": [checkpoint_json(r) for r in rows], "cursor": _cursor(limit, offset, total)}


def _own_checkpoint(request: Request, who, run_id: str, checkpoint_id: str) -> Row:
    svc = service_of(request)
    try:
        parsed = paths.parse_checkpoint_id(run_id, checkpoint_id)
    except paths.PathError as err:
        raise HTTPException(400, str(err)) from None
    row = svc.store.checkpoint(who.key_id, parsed.model_id, parsed.kind, parsed.name)
    if row is None or row.key_id != who.key_id:
        raise HTTPException(404, f"checkpoint_id: no checkpoint {checkpoint_id!r} in {run_id!r}")
    return row


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def publish(run_id: str, checkpoint_id: str, request: Request, who: Who) -> None:
    service_of(request).store.update_checkpoint(_own_checkpoint(request, who, run_id, checkpoint_id).id, public=True)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
def unpublish(run_id: str, checkpoint_id: str, request: Request, who: Who) -> None:
    service_of(request).store.update_checkpoint(_own_checkpoint(request, who, run_id, checkpoint_id).id, public=False)


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
def set_ttl(run_id: str, checkpoint_id: str, body: TtlBody, request: Request, who: Who) -> None:
    expires = time.time() + body.ttl_seconds if body.ttl_seconds else None
    service_of(request).store.update_checkpoint(_own_checkpoint(request, who, run_id, checkpoint_id).id,
                                                expires_at=expires)


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str, request: Request, who: Who) -> dict:
    svc = service_of(request)
    row = _own_checkpoint(request, who, run_id, checkpoint_id)
    if row.kind != "external":
        raise HTTPException(400, "checkpoint_id: only external_weights checkpoints can be downloaded")
    token, expires = secrets.token_urlsafe(24), time.time() + svc.cfg.ttl.download_url_s
    with svc.store.engine.begin() as conn:
        conn.execute(downloads.insert().values(token=token, checkpoint_id=row.id, expires_at=expires))
    base = str(request.base_url).rstrip("/")
    files = sorted(p.relative_to(row.directory).as_posix() for p in Path(row.directory).rglob("*") if p.is_file())
    return {"urls": {f: f"{base}/api/v1/downloads/{token}/{f}" for f in files}, "expires": _iso(expires)}


@router.get("/downloads/{token}/{relpath:path}")
def download(token: str, relpath: str, request: Request) -> FileResponse:
    svc = service_of(request)
    with svc.store.engine.connect() as conn:
        grant = conn.execute(select(downloads).where(downloads.c.token == token)).first()
    row = None if grant is None else svc.store.checkpoint_by_id(grant.checkpoint_id)
    if grant is None or grant.expires_at < time.time() or row is None:
        raise HTTPException(404, "no such download (or its URL expired)")
    root = Path(row.directory).resolve()
    target = (root / relpath).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise HTTPException(404, f"no file {relpath!r}")
    return FileResponse(target)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request, who: Who) -> None:
    remove_checkpoint(service_of(request), _own_checkpoint(request, who, run_id, checkpoint_id))


def remove_checkpoint(svc, row: Row) -> None:
    svc.store.delete_checkpoint(row.id)
    ckpt_files.remove(Path(row.directory))


@router.post("/weights_info")
def weights_info(body: WeightsInfoBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    row = resolve_checkpoint(svc, who, body.tinker_path, ("training", "sampler", "external"), "tinker_path")
    model = svc.store.model(None, row.model_id)
    return {"base_model": model.base_model, "is_lora": True, "lora_rank": model.lora["rank"],
            "train_unembed": model.lora["train_unembed"], "train_mlp": model.lora["train_mlp"],
            "train_attn": model.lora["train_attn"]}


@router.get("/sessions")
def list_sessions(request: Request, who: Who, limit: int = 20, offset: int = 0) -> dict:
    return {"sessions": service_of(request).store.list_sessions(who.key_id, max(0, min(limit, 1000)), max(0, offset))}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, request: Request, who: Who) -> dict:
    svc = service_of(request)
    row = svc.store.session(who.key_id, session_id)
    if row is None:
        raise HTTPException(404, f"session_id: no session {session_id!r}")
    runs, _ = svc.store.list_models(who.key_id, session_id=session_id)
    meta = {str(k): str(v) for k, v in (row.user_metadata or {}).items()}
    return {"training_run_ids": [m.id for m in runs], "sampler_ids": svc.store.sampler_ids(who.key_id, session_id),
            "user_metadata": meta}


@router.get("/usage")
def usage(request: Request, who: Who) -> dict:
    svc = service_of(request)
    return usage_report(svc.store, svc.cfg.price, who.key_id)
