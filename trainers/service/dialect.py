"""The clients the service speaks to: which one sent a request, and how its results are written.

One server serves the official ``tinker`` SDK and the ``hpcai`` SDK (a fork of an older
tinker). Their requests share the store, scheduler and metering; what differs is the wire:
tinker posts training data and reads results as protobuf and names checkpoints
``tinker://``, hpcai speaks JSON everywhere and names them ``hpcai://``. A request is hpcai's
when its path carries the ``/hpcai`` prefix (``HPCAI_BASE_URL=http://host:port/hpcai``), its
User-Agent is the hpcai client's (``AsyncHpcAI/Python 0.1.5``), it posts JSON training data
to ``forward_backward``, or it calls an endpoint only hpcai has; ``DialectRouter`` then serves
it from the routes under the prefix. Each stored request remembers its dialect, in which the
executor writes its result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from trainers.service import codec, hpcai_codec
from trainers.service.backend import ForwardBackwardResult, SampleResult
from trainers.service.paths import HPCAI, TINKER

HPCAI_PREFIX = "/hpcai"
HPCAI_AGENT = b"hpcai/"  # in the lower-cased User-Agent: AsyncHpcAI/..., HpcAI/...
HPCAI_ONLY = ("/api/v1/forward", "/api/v1/unload_model")
JSON = b"application/json"


@dataclass(frozen=True)
class Dialect:
    """How results reach one client: the encoders (bytes, is protobuf), the checkpoint path
    scheme, and its names for queue states."""

    name: str
    scheme: str
    forward_backward: Callable[[ForwardBackwardResult], tuple[bytes, bool]]
    sample: Callable[[SampleResult], tuple[bytes, bool]]
    queue_states: Mapping[str, str] = field(default_factory=dict)

    def queue_state(self, state: str) -> str:
        return self.queue_states.get(state, state)


TINKER_DIALECT = Dialect("tinker", TINKER, lambda r: (codec.encode_forward_backward(r), True),
                         lambda r: (codec.encode_sample(r), True))
HPCAI_DIALECT = Dialect("hpcai", HPCAI, lambda r: (hpcai_codec.forward_backward_json(r), False),
                        lambda r: (hpcai_codec.sample_json(r), False), {"paused_capacity": "in_queue"})
DIALECTS = {d.name: d for d in (TINKER_DIALECT, HPCAI_DIALECT)}


def speaks_hpcai(path: str, headers: Mapping[bytes, bytes]) -> bool:
    """Whether a request to ``path`` (under ``/api/``) comes from the hpcai client."""
    if HPCAI_AGENT in headers.get(b"user-agent", b"").lower() or path in HPCAI_ONLY:
        return True
    return path == "/api/v1/forward_backward" and headers.get(b"content-type", b"").startswith(JSON)


class DialectRouter:
    """ASGI middleware: moves hpcai requests under ``HPCAI_PREFIX``, where its routes are."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/") and \
                speaks_hpcai(scope["path"], dict(scope["headers"])):
            scope = {**scope, "path": HPCAI_PREFIX + scope["path"],
                     "raw_path": HPCAI_PREFIX.encode() + (scope.get("raw_path") or scope["path"].encode())}
        await self.app(scope, receive, send)
