"""The hpcai client's training and sampling endpoints: a thin layer over the service's own.

Each call is checked and translated into the requests a tinker client would store (same
store, scheduler, metering), tagged with the ``hpcai`` dialect, in which the executor writes
its result (JSON, ``hpcai://`` paths). What hpcai lacks is supplied here:
- no sessions: a key's hpcai models and samples belong to one implicit session
  (``hpcai-<key id>``), which the usage report lists like any other;
- no ``seq_id``: a model's requests are numbered on arrival (the client sends a model's next
  request only after the previous POST returned); retries deduplicate on ``X-Idempotency-Key``;
- the server names models: ``<session>:train:<digest of the idempotency key>``, so a retried
  ``create_model`` finds the model its first attempt created;
- a training checkpoint is loaded with its optimizer state (hpcai has one ``load_state``);
- refusals no retry can change are 400, never 409 or 429, which the client retries for minutes.
Endpoints whose shapes both clients share are served by the same handlers (``SHARED``).
"""

from __future__ import annotations

import hashlib
import uuid

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Row
from starlette.concurrency import run_in_threadpool

from rlcore.token_losses import LossInputError
from trainers.service import api_rest, api_session, api_training, hpcai_codec, paths
from trainers.service.api_models import (
    HpcaiCreateModelBody,
    HpcaiForwardBackwardBody,
    HpcaiForwardBody,
    HpcaiOptimBody,
    HpcaiPathBody,
    ModelIdBody,
    SampleBody,
)
from trainers.service.api_training import Who, check_forward_backward, future, own_model, service_of
from trainers.service.auth import Caller
from trainers.service.codec import WireError
from trainers.service.dialect import HPCAI_DIALECT, HPCAI_PREFIX
from trainers.service.service import Service, canonical
from trainers.service.store import Submission

DIALECT = HPCAI_DIALECT.name
RETRIED = (409, 429)  # statuses the client retries for minutes


class FinalRoute(APIRoute):
    """Answers 409 and 429 as 400: for these refusals a retry changes nothing."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except HTTPException as err:
                if err.status_code in RETRIED:
                    raise HTTPException(400, err.detail) from None
                raise

        return route


router = APIRouter(prefix=HPCAI_PREFIX + "/api/v1", route_class=FinalRoute)
SHARED = [("POST", "/retrieve_future", api_session.retrieve_future), ("POST", "/get_info", api_training.get_info),
          ("GET", "/get_server_capabilities", api_rest.get_server_capabilities),
          ("GET", "/healthz", api_session.healthz), ("POST", "/telemetry", api_session.telemetry)]
for _method, _path, _endpoint in SHARED:
    router.add_api_route(_path, _endpoint, methods=[_method])


def implicit_session(svc: Service, who: Caller) -> str:
    session_id = f"hpcai-{who.key_id}"
    svc.store.ensure_session(who.key_id, session_id, "hpcai")
    return session_id


def _idempotency_key(request: Request) -> str | None:
    return request.headers.get("x-idempotency-key")


def _model_op(svc: Service, who: Caller, request: Request, model: Row, kind: str, payload: bytes) -> dict:
    """Queues ``kind`` after everything the model has received so far."""
    sub = Submission(who.key_id, kind, payload, model.session_id, model.id, None, _idempotency_key(request),
                     next_seq=True, dialect=DIALECT)
    return future(svc.submit(who, sub), model.id)


@router.post("/create_model")
def create_model(body: HpcaiCreateModelBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    session_id = implicit_session(svc, who)
    key = _idempotency_key(request)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16] if key else uuid.uuid4().hex[:16]
    return api_training.submit_create(svc, who, request, session_id, f"{session_id}:train:{digest}",
                                      body.base_model, body.lora_config, None, DIALECT)


async def _json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """A large body read within ``limits.max_body_bytes``, parsed off the event loop."""
    raw = await api_training.read_body(request, service_of(request).cfg.limits.max_body_bytes)
    try:
        return await run_in_threadpool(model.model_validate_json, raw)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None


@router.post("/forward_backward")
async def forward_backward(request: Request, who: Who) -> dict:
    body = await _json_body(request, HpcaiForwardBackwardBody)
    return await run_in_threadpool(_forward_backward, request, who, body.model_id, body.forward_backward_input, False)


@router.post("/forward")
async def forward(request: Request, who: Who) -> dict:
    body = await _json_body(request, HpcaiForwardBody)
    return await run_in_threadpool(_forward_backward, request, who, body.model_id, body.forward_input, True)


def _forward_backward(request: Request, who: Caller, model_id: str, call, forward_only: bool) -> dict:
    svc = service_of(request)
    model = own_model(svc, who, model_id)
    try:
        payload = hpcai_codec.forward_backward_request(model.id, call, forward_only)
        check_forward_backward(svc, model, payload)
    except (WireError, LossInputError) as err:
        raise HTTPException(400, str(err)) from None
    return _model_op(svc, who, request, model, "forward_backward", payload)


@router.post("/optim_step")
def optim_step(body: HpcaiOptimBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    payload = canonical({"adam_params": body.adam_params.model_dump()})
    return _model_op(svc, who, request, own_model(svc, who, body.model_id), "optim_step", payload)


def _save(kind: str, body: HpcaiPathBody, request: Request, who: Caller) -> dict:
    svc = service_of(request)
    model = own_model(svc, who, body.model_id)
    try:
        paths.check_name(body.path)
    except paths.PathError as err:
        raise HTTPException(400, str(err)) from None
    return _model_op(svc, who, request, model, kind, canonical({"name": body.path}))


@router.post("/save_weights")
def save_weights(body: HpcaiPathBody, request: Request, who: Who) -> dict:
    return _save("save_weights", body, request, who)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: HpcaiPathBody, request: Request, who: Who) -> dict:
    return _save("save_weights_for_sampler", body, request, who)


@router.post("/load_weights")
def load_weights(body: HpcaiPathBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    model = own_model(svc, who, body.model_id)
    ckpt = api_training.resolve_checkpoint(svc, who, body.path, ("training", "sampler"))
    payload = canonical({"dir": ckpt.directory, "optimizer": ckpt.kind == "training", "path": body.path})
    return _model_op(svc, who, request, model, "load_weights", payload)


@router.post("/unload_model")
def unload_model(body: ModelIdBody, request: Request, who: Who) -> dict:
    svc = service_of(request)
    return _model_op(svc, who, request, own_model(svc, who, body.model_id), "unload_model", canonical({}))


@router.post("/asample")
def asample(body: SampleBody, request: Request, who: Who) -> dict:
    """Samples from ``model_path`` (its base model inferred) or ``base_model``."""
    svc = service_of(request)
    base, weights = api_session.sampler_source(svc, who, body.base_model, body.model_path)
    payload = api_session.sample_payload(svc, body, base, weights)
    sub = Submission(who.key_id, "sample", payload, implicit_session(svc, who), None, None,
                     _idempotency_key(request), dialect=DIALECT)
    return {"request_id": svc.submit(who, sub)}
