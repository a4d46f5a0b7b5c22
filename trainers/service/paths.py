"""``tinker://`` and ``hpcai://`` paths and where their checkpoints live on disk.

A path is ``tinker://<training run>/<weights|sampler_weights|external_weights>/<name>`` or, in
the hpcai client's dialect, ``hpcai://<training run>/<training|sampler>/<name>``: exactly three
``/``-separated parts (the clients parse them so); run ids may hold ``:``. Both name the same
checkpoints. They live under ``<state_dir>/checkpoints/<run>/<tinker segment>/<name>``
(``ckpt_files``: a link to the newest version).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TINKER, HPCAI = "tinker://", "hpcai://"
# scheme -> path segment -> checkpoint kind
SCHEMES = {TINKER: {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"},
           HPCAI: {"training": "training", "sampler": "sampler"}}
SEGMENTS = SCHEMES[TINKER]
KIND_SEGMENT = {kind: segment for segment, kind in SEGMENTS.items()}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


class PathError(ValueError):
    pass


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: str  # training | sampler | external
    name: str

    def __str__(self) -> str:
        return self.uri(TINKER)

    def uri(self, scheme: str) -> str:
        segment = next(seg for seg, kind in SCHEMES[scheme].items() if kind == self.kind)
        return f"{scheme}{self.model_id}/{segment}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{KIND_SEGMENT[self.kind]}/{self.name}"


def check_name(name: str, field: str = "path") -> str:
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise PathError(f"{field}: {name!r} is not a checkpoint name (letters, digits, . _ : -; at most 200)")
    return name


def parse(path: str, field: str = "path") -> TinkerPath:
    scheme = next((s for s in SCHEMES if isinstance(path, str) and path.startswith(s)), None)
    if scheme is None:
        raise PathError(f"{field}: {path!r} is not a tinker:// or hpcai:// path")
    segments = SCHEMES[scheme]
    parts = path[len(scheme):].split("/")
    if len(parts) != 3 or parts[1] not in segments or not parts[0]:
        raise PathError(f"{field}: {path!r} must be {scheme}<run>/<{'|'.join(segments)}>/<name>")
    return TinkerPath(parts[0], segments[parts[1]], check_name(parts[2], field))


def parse_checkpoint_id(model_id: str, checkpoint_id: str) -> TinkerPath:
    """``weights/<name>`` (the REST routes' form) of run ``model_id``."""
    return parse(f"tinker://{model_id}/{checkpoint_id}", "checkpoint_id")


def checkpoint_dir(state_dir: Path, path: TinkerPath) -> Path:
    return Path(state_dir) / "checkpoints" / path.model_id / KIND_SEGMENT[path.kind] / path.name
