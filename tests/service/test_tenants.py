"""Keys, isolation and hostile input against the real server (raw HTTP, one server).

No key or a revoked one -> 401; another key's sessions, models, futures and checkpoints ->
404; malformed, mistyped, out-of-order and oversize requests -> 4xx naming the field, and
the server keeps serving both tenants afterwards. Usage is metered per key."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.service.server_proc import SERVED
from trainers.service import wire

pytestmark = pytest.mark.slow  # about 2 minutes: a server start and several admin commands

def _proto_fb(model_id: str, seq_id: int, targets=None, dtype=wire.DTYPE_INT64, loss_fn="cross_entropy") -> bytes:
    msg = wire.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn)
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.arange(10, 16, dtype="<i4").tobytes()
    t = datum.loss_fn_inputs["target_tokens"]
    t.dtype, t.dense = dtype, np.asarray(targets or list(range(11, 17)), dtype="<i8").tobytes()
    w = datum.loss_fn_inputs["weights"]
    w.dtype, w.dense = wire.DTYPE_FLOAT32, np.ones(6, dtype="<f4").tobytes()
    return msg.SerializeToString()


class Tenant:
    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": key}, timeout=60)

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return self.http.post(path, json=body, **kw) if not isinstance(body, bytes) else self.http.post(
            path, content=body, headers={"Content-Type": "application/x-protobuf"}, **kw)

    def result(self, request_id: str) -> httpx.Response:
        for _ in range(20):
            r = self.post("/retrieve_future", {"request_id": request_id})
            if r.headers["content-type"] != "application/json" or r.json().get("type") != "try_again":
                return r
        raise AssertionError("no result")

    def model(self, rank: int = 2) -> str:
        sid = self.post("/create_session", {"tags": [], "sdk_version": "test"}).json()["session_id"]
        fut = self.post("/create_model", {"session_id": sid, "model_seq_id": 0, "base_model": SERVED,
                                          "lora_config": {"rank": rank}}).json()
        assert self.result(fut["request_id"]).json()["model_id"] == fut["model_id"]
        return fut["model_id"]


@pytest.fixture(scope="module")
def tenants(server):
    return Tenant(server.url, server.keys["alice"]), Tenant(server.url, server.keys["bob"])


def test_keys(server, tenants):
    assert httpx.post(server.url + "/api/v1/create_session", json={}).status_code == 401
    assert httpx.post(server.url + "/api/v1/create_session", json={}, headers={"X-API-Key": "tml-nope"}).status_code == 401
    key = server.admin("keys", "create", "carol", "max_lora_rank=4")
    carol = Tenant(server.url, key)
    sid = carol.post("/create_session", {}).json()["session_id"]
    r = carol.post("/create_model", {"session_id": sid, "model_seq_id": 0, "base_model": SERVED,
                                     "lora_config": {"rank": 8}})
    assert r.status_code == 400 and "rank" in r.text
    assert server.admin("keys", "revoke", key) == "revoked"
    assert carol.post("/create_session", {}).status_code == 401


def test_isolation(tenants):
    alice, bob = tenants
    model = alice.model()
    fut = alice.post("/forward_backward", _proto_fb(model, 1)).json()
    assert alice.result(fut["request_id"]).headers["content-type"] == "application/x-protobuf"
    save = alice.post("/save_weights", {"model_id": model, "seq_id": 2, "path": "mine"}).json()
    path = alice.result(save["request_id"]).json()["path"]
    assert bob.post("/get_info", {"model_id": model}).status_code == 404
    assert bob.post("/forward_backward", _proto_fb(model, 3)).status_code == 404
    assert bob.post("/optim_step", {"model_id": model, "seq_id": 3, "adam_params": {}}).status_code == 404
    assert bob.post("/retrieve_future", {"request_id": fut["request_id"]}).status_code == 404
    assert bob.post("/weights_info", {"tinker_path": path}).status_code == 404
    assert bob.http.get(f"/training_runs/{model}").status_code == 404
    assert bob.http.delete(f"/training_runs/{model}/checkpoints/weights/mine").status_code == 404
    assert bob.http.get("/training_runs").json()["training_runs"] == []
    assert bob.http.get("/checkpoints").json()["checkpoints"] == []
    sid = bob.post("/create_session", {}).json()["session_id"]
    assert bob.post("/load_weights", {"session_id": sid, "model_seq_id": 0, "path": path,
                                      "optimizer": True}).status_code == 404
    assert bob.post("/create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                                 "model_path": path}).status_code == 404
    assert alice.http.get(f"/training_runs/{model}").json()["training_run_id"] == model


def test_bad_input_corpus(tenants):
    alice, bob = tenants
    model = alice.model()
    cases = [
        (alice.post("/forward_backward", b"\x08\x96\x01\xff\xff"), 400, "body"),
        (alice.post("/forward_backward", _proto_fb("nope:train:0", 1)), 404, "model_id"),
        (alice.post("/forward_backward", _proto_fb(model, 1, dtype=wire.DTYPE_FLOAT32)), 400, "target_tokens"),
        (alice.post("/forward_backward", _proto_fb(model, 2, targets=[1, 2, 3, 4, 5, 10**9])), 400, "target_tokens"),
        (alice.post("/forward_backward", _proto_fb(model, 3, loss_fn="stable_reinforce")), 400, "importance_sampling"),
        (alice.post("/forward_backward", _proto_fb(model, 10**7)), 400, "seq_id"),
        (alice.post("/forward_backward", b"\x00" * 2_100_000), 413, "body"),
        (alice.post("/create_model", {"session_id": "x", "model_seq_id": "a", "base_model": SERVED}), 422,
         "model_seq_id"),
        (alice.http.post("/create_session", content=b"{not json", headers={"Content-Type": "application/json"}),
         400, "JSON"),
        (alice.post("/optim_step", {"model_id": model, "seq_id": 4, "adam_params": {"learning_rate": -1}}), 422,
         "learning_rate"),
        (alice.post("/asample", {"prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {},
                                 "base_model": "unknown/model"}), 400, "base_model"),
        (alice.post("/asample", {"prompt": {"chunks": [{"tokens": [-5]}]}, "sampling_params": {},
                                 "base_model": SERVED}), 400, "prompt"),
        (alice.post("/asample", {"prompt": {"chunks": [{"tokens": [1]}]}, "num_samples": 10**6,
                                 "sampling_params": {}, "base_model": SERVED}), 400, "num_samples"),
        (alice.post("/retrieve_future", {"request_id": "nope"}), 404, "request_id"),
        (alice.post("/load_weights", {"model_id": model, "seq_id": 4, "path": "tinker://x/weights/y",
                                      "optimizer": False}), 404, "path"),
        (alice.post("/save_weights", {"model_id": model, "seq_id": 4, "path": "../escape"}), 400, "path"),
    ]
    for response, status, word in cases:
        assert response.status_code == status and word in response.text, (response.status_code, response.text)
    ok = alice.post("/forward_backward", _proto_fb(model, 5)).json()  # seq 1-4 were refused and skipped
    assert alice.result(ok["request_id"]).status_code == 200
    stale = alice.post("/forward_backward", _proto_fb(model, 5, targets=[12, 13, 14, 15, 16, 17]))
    assert stale.status_code == 409
    again = alice.post("/forward_backward", _proto_fb(model, 5)).json()
    assert again["request_id"] == ok["request_id"]
    assert bob.post("/create_session", {}).status_code == 200


def test_usage(server, tenants):
    alice, _ = tenants
    mine = alice.http.get("/usage").json()
    assert list(mine["keys"]) and all(k["tokens"]["train"] > 0 for k in mine["keys"].values())
    report = json.loads(server.admin("usage"))
    assert report["currency"] == "USD" and len(report["keys"]) >= 1
