"""Training endpoints: create_model, get_info, forward_backward, optim_step, the saves, loads.

Each asynchronous call is checked completely before it is stored (unknown model -> 404,
invalid input -> 400 naming the field), so the scheduler only meets requests it can run. A
call refused after its model and ``seq_id`` are known is stored as failed: it holds its
``seq_id`` so the model's later requests are not stuck waiting for it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlalchemy.engine import Row

from rlcore.token_losses import LossInputError, check_inputs, resolve_loss
from trainers.service import paths
from trainers.service.api_models import (
    CreateModelBody,
    LoadBody,
    LoraBody,
    ModelIdBody,
    OptimBody,
    SaveBody,
    SaveForSamplerBody,
)
from trainers.service.auth import Caller, caller
from trainers.service.codec import ForwardBackwardCall, WireError, decode_forward_backward, model_and_seq
from trainers.service.service import Service, canonical
from trainers.service.store import Submission

router = APIRouter(prefix="/api/v1")
Who = Annotated[Caller, Depends(caller)]


def service_of(request: Request) -> Service:
    return request.app.state.service


def own_model(svc: Service, who: Caller, model_id: str) -> Row:
    model = svc.store.model(who.key_id, model_id)
    if model is None:
        raise HTTPException(404, f"model_id: no model {model_id!r}")
    return model


def future(rid: str, model_id: str | None = None) -> dict:
    return {"request_id": rid, "model_id": model_id}


def submit_model_op(svc: Service, who: Caller, model: Row, kind: str, seq_id: int, body: bytes,
                    request: Request, error: str | None = None) -> str:
    if seq_id > model.next_seq + svc.cfg.limits.max_seq_ahead:
        raise HTTPException(400, f"seq_id: {seq_id} is too far ahead of the next expected {model.next_seq}")
    sub = Submission(who.key_id, kind, body, model.session_id, model.id, seq_id,
                     request.headers.get("x-idempotency-key"), "failed" if error else "pending", error)
    return svc.submit(who, sub, min_seq=model.next_seq)


def refuse(svc: Service, who: Caller, model: Row, kind: str, seq_id: int, body: bytes, request: Request,
           status: int, message: str) -> HTTPException:
    """Stores the refused call (holding its seq_id) and returns the HTTP error to raise."""
    submit_model_op(svc, who, model, kind, seq_id, body, request, error=message)
    return HTTPException(status, message)


def _rank_limit(svc: Service, who: Caller, base_model: str) -> int:
    limits = [svc.cfg.limits.max_lora_rank, svc.models[base_model].max_lora_rank]
    return min(limits + ([who.limits.max_lora_rank] if who.limits.max_lora_rank else []))


def new_model(svc: Service, who: Caller, session_id: str, model_id: str, base_model: str, lora: dict,
              user_metadata: dict | None) -> None:
    """Checks a new model's settings and stores it (once: a resubmission finds it)."""
    if svc.store.session(who.key_id, session_id) is None:
        raise HTTPException(404, f"session_id: no session {session_id!r}")
    if base_model not in svc.models:
        raise HTTPException(400, f"base_model: {base_model!r} is not served (served: {', '.join(svc.models)})")
    if lora["rank"] > _rank_limit(svc, who, base_model):
        raise HTTPException(400, f"lora_config.rank: {lora['rank']} exceeds the limit "
                                 f"{_rank_limit(svc, who, base_model)}")
    if not (lora["train_mlp"] or lora["train_attn"] or lora["train_unembed"]):
        raise HTTPException(400, "lora_config: at least one of train_mlp, train_attn, train_unembed must be true")
    existing = svc.store.model(None, model_id)
    if existing is None:
        if who.limits.max_models and svc.store.list_models(who.key_id, limit=0)[1] >= who.limits.max_models:
            raise HTTPException(429, f"this key may hold at most {who.limits.max_models} models")
        svc.insert_once(svc.store.insert_model, id=model_id, key_id=who.key_id, session_id=session_id,
                        base_model=base_model, lora=lora, user_metadata=user_metadata)
    elif existing.key_id != who.key_id:
        raise HTTPException(404, f"session_id: no session {session_id!r}")


def submit_create(svc: Service, who: Caller, request: Request, session_id: str, model_id: str, base_model: str,
                  lora_body: LoraBody, user_metadata: dict | None, dialect: str = "tinker") -> dict:
    """Stores a new LoRA model named ``model_id`` and the request that creates its adapter."""
    lora = lora_body.model_dump()
    lora["seed"] = lora["seed"] or 0
    new_model(svc, who, session_id, model_id, base_model, lora, user_metadata)
    payload = canonical({"base_model": base_model, "lora": lora, "load": None})
    rid = svc.submit(who, Submission(who.key_id, "create_model", payload, session_id, model_id, 0,
                                     request.headers.get("x-idempotency-key"), dialect=dialect))
    return future(rid, model_id)


@router.post("/create_model")
def create_model(body: CreateModelBody, request: Request, who: Who) -> dict:
    return submit_create(service_of(request), who, request, body.session_id,
                         f"{body.session_id}:train:{body.model_seq_id}", body.base_model, body.lora_config,
                         body.user_metadata)


@router.post("/get_info")
def get_info(body: ModelIdBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    model = own_model(svc, who, body.model_id)
    info = svc.models[model.base_model]
    return {"type": "get_info", "model_id": model.id, "is_lora": True, "lora_rank": model.lora["rank"],
            "model_name": model.base_model,
            "model_data": {"arch": info.arch, "model_name": model.base_model, "tokenizer_id": info.tokenizer_id}}


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"body: larger than the limit of {limit} bytes")
    if request.headers.get("content-encoding", "identity") != "identity":
        raise HTTPException(415, "body: compressed bodies are not supported")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body: larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/forward_backward")
async def forward_backward(request: Request, who: Who) -> dict:
    from starlette.concurrency import run_in_threadpool

    svc = service_of(request)
    body = await read_body(request, svc.cfg.limits.max_body_bytes)
    return await run_in_threadpool(_submit_forward_backward, svc, who, body, request)


def _submit_forward_backward(svc: Service, who: Caller, body: bytes, request: Request) -> dict:
    try:
        model_id, seq_id = model_and_seq(body)
    except WireError as err:
        raise HTTPException(400, str(err)) from None
    model = own_model(svc, who, model_id)
    if seq_id < 1:
        raise HTTPException(400, f"seq_id: must be >= 1, got {seq_id}")
    try:
        check_forward_backward(svc, model, body)
    except (WireError, LossInputError) as err:
        raise refuse(svc, who, model, "forward_backward", seq_id, body, request, 400, str(err)) from None
    return future(submit_model_op(svc, who, model, "forward_backward", seq_id, body, request), model.id)


def check_forward_backward(svc: Service, model: Row, body: bytes) -> ForwardBackwardCall:
    """The decoded call, if the model can run it (else ``WireError`` or ``LossInputError``)."""
    call = decode_forward_backward(body, svc.vocab[model.base_model])
    limits, context = svc.cfg.limits, svc.models[model.base_model].max_context_length
    if len(call.data) > limits.max_datums:
        raise WireError("data", f"{len(call.data)} datums exceed the limit of {limits.max_datums}")
    if call.tokens > limits.max_tokens:
        raise WireError("data", f"{call.tokens} tokens exceed the limit of {limits.max_tokens}")
    loss, _ = resolve_loss(call.loss_fn, call.loss_fn_config)
    for i, datum in enumerate(call.data):
        if datum.tokens.numel() > context:
            raise WireError(f"data[{i}].model_input", f"{datum.tokens.numel()} tokens exceed the context of {context}")
        check_inputs(loss, datum.loss_fn_inputs, datum.tokens.numel(), f"data[{i}].loss_fn_inputs")
    return call


@router.post("/optim_step")
def optim_step(body: OptimBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    model = own_model(svc, who, body.model_id)
    payload = canonical({"adam_params": body.adam_params.model_dump()})
    return future(submit_model_op(svc, who, model, "optim_step", body.seq_id, payload, request), model.id)


def _save(kind: str, body: SaveBody, request: Request, who: Caller, extra: dict) -> dict:
    svc = service_of(request)
    model = own_model(svc, who, body.model_id)
    name = body.path
    payload = canonical({"name": name, "ttl_seconds": body.ttl_seconds, "user_metadata": body.user_metadata,
                         **extra})
    if name is not None:
        try:
            paths.check_name(name)
        except paths.PathError as err:
            raise refuse(svc, who, model, kind, body.seq_id, payload, request, 400, str(err)) from None
    return future(submit_model_op(svc, who, model, kind, body.seq_id, payload, request), model.id)


@router.post("/save_weights")
def save_weights(body: SaveBody, request: Request, who: Who) -> dict:
    if body.path is None:
        body = body.model_copy(update={"path": f"checkpoint-{body.seq_id:06d}"})
    return _save("save_weights", body, request, who, {})


@router.post("/save_weights_external")
def save_weights_external(body: SaveBody, request: Request, who: Who) -> dict:
    if body.path is None:
        body = body.model_copy(update={"path": f"export-{body.seq_id:06d}"})
    return _save("save_weights_external", body, request, who, {})


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: SaveForSamplerBody, request: Request, who: Who) -> dict:
    if body.path is None and body.sampling_session_seq_id is None:
        raise HTTPException(400, "path: a name, or sampling_session_seq_id for an ephemeral save, is required")
    return _save("save_weights_for_sampler", body, request, who,
                 {"sampling_session_seq_id": body.sampling_session_seq_id})


def resolve_checkpoint(svc: Service, who: Caller, path: str, kinds: tuple[str, ...], field: str = "path") -> Row:
    """The checkpoint a tinker:// or hpcai:// path names, if the caller may read it (own or public)."""
    try:
        parsed = paths.parse(path, field)
    except paths.PathError as err:
        raise HTTPException(400, str(err)) from None
    row = svc.store.checkpoint(who.key_id, parsed.model_id, parsed.kind, parsed.name)
    if row is None or parsed.kind not in kinds:
        raise HTTPException(404, f"{field}: no checkpoint {path!r}")
    return row


@router.post("/load_weights")
def load_weights(body: LoadBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    kinds = ("training",) if body.optimizer else ("training", "sampler")
    ckpt = resolve_checkpoint(svc, who, body.path, kinds)
    load = {"dir": ckpt.directory, "optimizer": body.optimizer, "path": body.path}
    if body.model_id is not None:
        if body.seq_id is None:
            raise HTTPException(400, "seq_id: required with model_id")
        model = own_model(svc, who, body.model_id)
        payload = canonical(load)
        return future(submit_model_op(svc, who, model, "load_weights", body.seq_id, payload, request), model.id)
    if body.session_id is None or body.model_seq_id is None:
        raise HTTPException(400, "model_id, or session_id and model_seq_id, are required")
    source = svc.store.model(None, ckpt.model_id)
    model_id = f"{body.session_id}:train:{body.model_seq_id}"
    new_model(svc, who, body.session_id, model_id, source.base_model, dict(source.lora), body.user_metadata)
    payload = canonical({"base_model": source.base_model, "lora": source.lora, "load": load})
    rid = svc.submit(who, Submission(who.key_id, "create_model", payload, body.session_id, model_id, 0,
                                     request.headers.get("x-idempotency-key")))
    return future(rid, model_id)
