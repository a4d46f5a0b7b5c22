"""Runs stored requests against the backend and says what each produced.

Each request kind reads the normalised JSON body the API stored (forward_backward: the
client's protobuf, or hpcai's JSON translated to it) and returns an ``Outcome`` whose result
is written in the dialect of the client that sent the request; requests that change an
adapter's weights or optimizer end with a journal snapshot (``applied``). ``restore`` makes a
model's adapter resident as of its last finished request: newest snapshot, a step the
database missed finished from the snapshot's answer, then the gradients of finished
forward_backward requests recomputed. Checkpoints are written as versions (``ckpt_files``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Row

from trainers.service import ckpt_files
from trainers.service.backend import AdamParams, AdapterSpec, Backend, SampleRequest
from trainers.service.codec import decode_forward_backward
from trainers.service.db import requests, sampling_sessions
from trainers.service.dialect import DIALECTS
from trainers.service.journal import Journal
from trainers.service.paths import TinkerPath, checkpoint_dir
from trainers.service.queue import Outcome, Queue
from trainers.service.store import Store


def _json(value: dict) -> bytes:
    return json.dumps(value).encode()


def adapter_spec(model: Row) -> AdapterSpec:
    return AdapterSpec(base_model=model.base_model, **model.lora)


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


class Executor:
    def __init__(self, backend: Backend, store: Store, queue: Queue, journal: Journal, state_dir: Path,
                 vocab: dict[str, int], sampler_ttl_s: int):
        self.backend, self.store, self.queue, self.journal = backend, store, queue, journal
        self.state_dir = Path(state_dir)
        self.vocab = vocab
        self.sampler_ttl_s = sampler_ttl_s

    # --- residency ----------------------------------------------------------------------
    def restore(self, model: Row) -> None:
        self.backend.create_adapter(model.id, adapter_spec(model))
        newest = self.journal.newest(model.id)
        if newest is None:
            return
        seq, snapshot = newest
        self.backend.load_state(model.id, snapshot, with_optimizer=True)
        if seq > model.applied_seq:
            with self.store.engine.connect() as conn:
                row = conn.execute(select(requests).where(requests.c.order_key == model.id,
                                                          requests.c.seq_id == seq)).first()
            if row is not None and row.status not in ("done", "failed"):
                self.queue.complete(row, Outcome(_json(self.journal.result(snapshot)), applied=True))
        for row in self.queue.finished_fwdbwd_after(model.id, seq):
            call = decode_forward_backward(row.body, self.vocab[model.base_model])
            if not call.forward_only:
                self.backend.forward_backward(model.id, call.data, call.loss_fn, call.loss_fn_config, False)

    # --- model requests -----------------------------------------------------------------
    def run(self, model: Row, request: Row) -> Outcome:
        if request.kind == "forward_backward":
            call = decode_forward_backward(request.body, self.vocab[model.base_model])
            result = self.backend.forward_backward(model.id, call.data, call.loss_fn, call.loss_fn_config,
                                                   call.forward_only)
            kind = "prefill_tokens" if call.forward_only else "train_tokens"
            encoded, proto = DIALECTS[request.dialect].forward_backward(result)
            return Outcome(encoded, proto=proto, **{kind: call.tokens})
        body = json.loads(request.body)
        return getattr(self, f"_{request.kind}")(model, request, body)

    def _snapshot(self, model: Row, request: Row, answer: dict) -> Outcome:
        self.journal.write(model.id, request.seq_id, answer,
                           lambda d: self.backend.save_state(model.id, d, with_optimizer=True))
        return Outcome(_json(answer), applied=True)

    def _create_model(self, model: Row, request: Row, body: dict) -> Outcome:
        if body.get("load"):
            self.backend.load_state(model.id, Path(body["load"]["dir"]), body["load"]["optimizer"])
            answer = {"type": "load_weights", "model_id": model.id, "path": body["load"]["path"]}
        else:
            answer = {"type": "create_model", "model_id": model.id}
        return self._snapshot(model, request, answer)

    def _optim_step(self, model: Row, request: Row, body: dict) -> Outcome:
        metrics = self.backend.optim_step(model.id, AdamParams(**body["adam_params"]))
        return self._snapshot(model, request, {"metrics": metrics})

    def _load_weights(self, model: Row, request: Row, body: dict) -> Outcome:
        self.backend.load_state(model.id, Path(body["dir"]), body["optimizer"])
        return self._snapshot(model, request, {"type": "load_weights", "path": body["path"]})

    def _unload_model(self, model: Row, request: Row, body: dict) -> Outcome:
        return Outcome(_json({"type": "unload_model", "model_id": model.id}), evict=True)

    def _save(self, model: Row, request: Row, path: TinkerPath, with_optimizer: bool, export: bool,
              ttl_s: int | None, user_metadata: dict | None) -> Outcome:
        """Writes a new version of checkpoint ``path`` and records it with the request's answer."""
        link = checkpoint_dir(self.state_dir, path)

        def write(out: Path) -> None:
            if not export:
                self.backend.save_state(model.id, out, with_optimizer=with_optimizer)
                return
            staging = link.with_name(link.name + "@state")
            shutil.rmtree(staging, ignore_errors=True)
            self.backend.save_state(model.id, staging, with_optimizer=False)
            self.backend.export_peft(staging, out)
            shutil.rmtree(staging)

        version = ckpt_files.write(link, request.seq_id, write)
        values = dict(key_id=model.key_id, model_id=model.id, kind=path.kind, name=path.name, directory=str(link),
                      size_bytes=_size(version), user_metadata=user_metadata,
                      expires_at=time.time() + ttl_s if ttl_s else None)
        outcome = Outcome(b"")
        outcome.extra.append(lambda conn: self.store.put_checkpoint(conn, **values))
        return outcome

    def _save_weights(self, model: Row, request: Row, body: dict) -> Outcome:
        path = TinkerPath(model.id, "training", body["name"])
        outcome = self._save(model, request, path, True, False, body.get("ttl_seconds"), body.get("user_metadata"))
        outcome.result = _json({"type": "save_weights", "path": path.uri(DIALECTS[request.dialect].scheme)})
        return outcome

    def _save_weights_external(self, model: Row, request: Row, body: dict) -> Outcome:
        path = TinkerPath(model.id, "external", body["name"])
        outcome = self._save(model, request, path, False, True, body.get("ttl_seconds"), None)
        outcome.result = _json({"type": "save_weights_external", "path": str(path)})
        return outcome

    def _save_weights_for_sampler(self, model: Row, request: Row, body: dict) -> Outcome:
        ephemeral = body["name"] is None
        name = body["name"] or f"ephemeral-{request.seq_id}"
        path = TinkerPath(model.id, "sampler", name)
        ttl = body.get("ttl_seconds") or (self.sampler_ttl_s if ephemeral else None)
        outcome = self._save(model, request, path, False, False, ttl, body.get("user_metadata"))
        sampling_id = None
        if body.get("sampling_session_seq_id") is not None:
            sampling_id = f"{request.session_id}:sample:{body['sampling_session_seq_id']}"
            values = dict(id=sampling_id, key_id=model.key_id, session_id=request.session_id,
                          base_model=model.base_model, model_path=None if ephemeral else str(path),
                          weights_dir=str(checkpoint_dir(self.state_dir, path)), created_at=time.time())

            def record(conn) -> None:
                conn.execute(sampling_sessions.delete().where(sampling_sessions.c.id == sampling_id))
                conn.execute(sampling_sessions.insert().values(**values))

            outcome.extra.append(record)
        uri = path.uri(DIALECTS[request.dialect].scheme)
        outcome.result = _json({"type": "save_weights_for_sampler", "path": None if ephemeral else uri,
                                "sampling_session_id": sampling_id})
        return outcome

    # --- downloads ----------------------------------------------------------------------
    def export(self, row: Row) -> Outcome:
        """The PEFT adapter of a checkpoint version, packed for download (once per version)."""
        version = Path(json.loads(row.body)["dir"])
        archive = ckpt_files.archive_path(version)
        if not archive.is_file():
            ckpt_files.write_archive(version, lambda out: self.backend.export_peft(version, out))
        return Outcome(_json({"archive": str(archive)}))

    # --- sampling -----------------------------------------------------------------------
    @staticmethod
    def sample_request(body: dict) -> SampleRequest:
        """The backend's request; a checkpoint's link resolved to its newest version, so the
        backend's caches, keyed by directory, never take one save for another."""
        stop, weights = body["stop"], body["weights_dir"]
        return SampleRequest(**{**body, "prompt": tuple(body["prompt"]), "stop": None if stop is None else tuple(stop),
                                "weights_dir": None if weights is None else os.path.realpath(weights)})

    def sample(self, rows: list[Row]) -> list[Outcome]:
        """One backend call for every row; tokens metered per row."""
        reqs = [self.sample_request(json.loads(r.body)) for r in rows]
        results = self.backend.sample(reqs)
        return [Outcome(*DIALECTS[row.dialect].sample(res), prefill_tokens=len(req.prompt),
                        sample_tokens=sum(len(s.tokens) for s in res.sequences))
                for row, req, res in zip(rows, reqs, results)]
