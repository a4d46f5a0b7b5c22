"""Session, sampling and future endpoints: the client's bootstrap, asample, retrieve_future.

``retrieve_future`` long-polls: it holds the call until the request finishes or
``ttl.long_poll_s`` passes (the client re-polls at once on ``try_again``), so waiting
clients cost the server a sleeping coroutine, not a busy loop.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request, Response
from sqlalchemy.engine import Row
from starlette.concurrency import run_in_threadpool

from trainers.service.api_models import (
    FinishBody,
    FutureBody,
    HeartbeatBody,
    SampleBody,
    SamplingSessionBody,
    SessionBody,
)
from trainers.service.api_training import Who, resolve_checkpoint, service_of
from trainers.service.dialect import DIALECTS
from trainers.service.service import Service, canonical
from trainers.service.store import TERMINAL, Submission

router = APIRouter(prefix="/api/v1")
PROTO = "application/x-protobuf"
DEFAULT_MAX_TOKENS = 64


@router.post("/client/config")
def client_config() -> dict:
    return {"pjwt_auth_enabled": False, "use_pyqwest_transport": False}


@router.post("/client/dynamic_config")
def dynamic_config() -> dict:
    return {}


@router.post("/telemetry")
def telemetry() -> dict:
    return {"status": "accepted"}


@router.get("/healthz")
def healthz(request: Request) -> dict:
    return {"status": "ok", "scheduler": dict(service_of(request).scheduler.stats)}


@router.post("/create_session")
def create_session(body: SessionBody, request: Request, who: Who) -> dict:
    sid = service_of(request).store.create_session(who.key_id, body.tags, body.user_metadata, body.sdk_version)
    return {"type": "create_session", "session_id": sid}


@router.post("/session_heartbeat")
def session_heartbeat(body: HeartbeatBody, request: Request, who: Who) -> dict:
    if not service_of(request).store.touch_session(who.key_id, body.session_id):
        raise HTTPException(404, f"session_id: no session {body.session_id!r}")
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: FinishBody, request: Request, who: Who) -> dict:
    reason = str((body.reason or {}).get("type", "success"))[:32]
    if not service_of(request).store.touch_session(who.key_id, session_id, finish_reason=reason):
        raise HTTPException(404, f"session_id: no session {session_id!r}")
    return {"status": "finished"}


def sampler_source(svc: Service, who, base_model: str | None, model_path: str | None) -> tuple[str, str | None]:
    """(base model, sampler weights directory or None) for a base name or a checkpoint path."""
    if model_path:
        ckpt = resolve_checkpoint(svc, who, model_path, ("sampler", "training"), "model_path")
        return svc.store.model(None, ckpt.model_id).base_model, ckpt.directory
    if base_model not in svc.models:
        raise HTTPException(400, f"base_model: {base_model!r} is not served (served: {', '.join(svc.models)})")
    return base_model, None


@router.post("/create_sampling_session")
def create_sampling_session(body: SamplingSessionBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    if svc.store.session(who.key_id, body.session_id) is None:
        raise HTTPException(404, f"session_id: no session {body.session_id!r}")
    base, weights = sampler_source(svc, who, body.base_model, body.model_path)
    sid = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
    svc.insert_once(svc.store.insert_sampling_session, id=sid, key_id=who.key_id, session_id=body.session_id,
                    base_model=base, model_path=body.model_path, weights_dir=weights)
    return {"type": "create_sampling_session", "sampling_session_id": sid}


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, request: Request, who: Who) -> dict:
    row = service_of(request).store.sampling_session(who.key_id, sampler_id)
    if row is None:
        raise HTTPException(404, f"sampler_id: no sampler {sampler_id!r}")
    return {"sampler_id": row.id, "base_model": row.base_model, "model_path": row.model_path}


def _stop(value) -> list | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


@router.post("/asample")
def asample(body: SampleBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    session_id = None
    if body.sampling_session_id:
        row = svc.store.sampling_session(who.key_id, body.sampling_session_id)
        if row is None:
            raise HTTPException(404, f"sampling_session_id: no sampler {body.sampling_session_id!r}")
        base, weights, session_id = row.base_model, row.weights_dir, row.session_id
    else:
        base, weights = sampler_source(svc, who, body.base_model, body.model_path)
    payload = sample_payload(svc, body, base, weights)
    seq = body.seq_id if body.sampling_session_id else None
    rid = svc.submit(who, Submission(who.key_id, "sample", payload, session_id, body.sampling_session_id, seq,
                                     request.headers.get("x-idempotency-key")))
    return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(body.num_samples)]}


def sample_payload(svc: Service, body: SampleBody, base: str, weights: str | None) -> bytes:
    """The stored body of a sample request, after checking it against the limits (400/413)."""
    prompt = [t for chunk in body.prompt.chunks for t in chunk.tokens]
    if any(chunk.type != "encoded_text" for chunk in body.prompt.chunks):
        raise HTTPException(400, "prompt.chunks: only encoded_text chunks are supported")
    vocab, limits = svc.vocab[base], svc.cfg.limits
    if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
        raise HTTPException(400, f"prompt: must hold token ids in [0, {vocab})")
    params = body.sampling_params
    max_tokens = params.max_tokens or DEFAULT_MAX_TOKENS
    if body.num_samples > limits.max_num_samples or max_tokens > limits.max_sample_tokens:
        raise HTTPException(400, f"num_samples/max_tokens: at most {limits.max_num_samples} samples of "
                                 f"{limits.max_sample_tokens} tokens")
    if len(prompt) + max_tokens > svc.models[base].max_context_length:
        raise HTTPException(400, f"prompt: with max_tokens it exceeds the context of "
                                 f"{svc.models[base].max_context_length}")
    if (len(prompt) + max_tokens) * body.num_samples > svc.cfg.capacity.tokens_in_flight:
        raise HTTPException(413, "num_samples: the request exceeds the server's tokens in flight")
    stop = _stop(params.stop)
    if stop and isinstance(stop[0], int) and (min(stop) < 0 or max(stop) >= vocab):
        raise HTTPException(400, f"sampling_params.stop: token ids must lie in [0, {vocab})")
    return canonical({"base_model": base, "weights_dir": weights, "prompt": prompt, "num_samples": body.num_samples,
                      "max_tokens": max_tokens, "temperature": params.temperature, "top_k": params.top_k,
                      "top_p": params.top_p, "seed": params.seed, "stop": stop,
                      "prompt_logprobs": bool(body.prompt_logprobs) or body.topk_prompt_logprobs > 0,
                      "topk_prompt_logprobs": body.topk_prompt_logprobs})


async def wait_for(svc: Service, who, request_id: str) -> Row:
    """The request once it finished, or as it is after ``ttl.long_poll_s`` (404 if not the caller's)."""
    deadline = time.monotonic() + svc.cfg.ttl.long_poll_s
    while True:
        row = await run_in_threadpool(svc.store.request, who.key_id, request_id)
        if row is None:
            raise HTTPException(404, f"request_id: no request {request_id!r}")
        if row.status in TERMINAL or time.monotonic() >= deadline:
            return row
        await svc.notifier.wait(row.id, min(1.0, deadline - time.monotonic()))


@router.post("/retrieve_future")
async def retrieve_future(body: FutureBody, request: Request, who: Who) -> Response:
    row = await wait_for(service_of(request), who, body.request_id)
    if row.status == "done":
        return Response(row.result, media_type=PROTO if row.result_proto else "application/json")
    if row.status == "failed":
        return Response(canonical({"error": row.error, "category": row.category or "unknown"}),
                        media_type="application/json")
    state = DIALECTS[row.dialect].queue_state(row.queue_state)
    return Response(canonical({"type": "try_again", "request_id": row.id, "queue_state": state}),
                    media_type="application/json")
