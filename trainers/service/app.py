"""The FastAPI application: routes, error shapes, and the service's start and stop.

Errors keep the client's mapping: validation errors are 422 naming the field (400 for a
body that is not JSON), every unexpected exception a 500 with its type, never a crash; the
scheduler thread starts with the app and stops with it. The hpcai client's dialect is served
under ``/hpcai`` (``trainers.service.dialect``).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from trainers.service import api_hpcai, api_hpcai_rest, api_rest, api_session, api_training
from trainers.service.dialect import DialectRouter
from trainers.service.service import Service

log = logging.getLogger("trillora.service")
THREADS = 64  # request handlers that touch the database run in this many threads


def _field(loc) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        to_thread.current_default_thread_limiter().total_tokens = THREADS
        service.notifier.loop = asyncio.get_running_loop()
        service.scheduler.start()
        yield
        service.scheduler.stop()

    app = FastAPI(title="trillora Tinker-compatible service", lifespan=lifespan)
    app.state.service = service
    for module in (api_session, api_training, api_rest, api_hpcai, api_hpcai_rest):
        app.include_router(module.router)
    app.add_middleware(DialectRouter)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return JSONResponse({"detail": "body: not valid JSON"}, status_code=400)
        first = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"detail": first, "errors": [{"field": _field(e["loc"]), "message": e["msg"]}
                                                         for e in errors[:20]]}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    return app
