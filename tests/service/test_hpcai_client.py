"""The hpcai SDK (0.2, its own venv) against the real server: every ServiceClient,
TrainingClient, SamplingClient and RestClient method (``hpcai_driver.py calls``), checked here
against independent computations: cross_entropy against the returned log-probs and against
HF + PEFT on the downloaded archive, the RL losses against their formulas, the sampler's
log-probs against the training client's, save/load exact. Then a tinker client and an hpcai
client training at once on one key, each equal to training alone and both metered; and the
dialect on the wire: how requests are told apart, idempotent retries, try_again, isolation
between keys, refusals that the client would not retry."""

from __future__ import annotations

import json
import tarfile
import threading
import time

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types

from rlcore.token_losses import DEFAULT_CLIP
from tests.service.hpcai_proc import DRIVER, hpcai_env, run_hpcai, start_hpcai
from tests.service.references import loss_formula, peft_logprobs
from tests.service.server_proc import HPCAI_SERVED

pytestmark = pytest.mark.slow
TOKENS = list(range(1000, 1040))


# vLLM's sampler (merged weights) against the Megatron training fleet (LoRA unmerged). vLLM's
# log-softmax is fp32 over the served base's 151,915 identical unused rows (torch's is off by
# 4e-5 there, Megatron's vocab-parallel one by 2e-6); 2.6e-4 was seen between the two.
ENGINES_ATOL = 1e-3


def gap(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def calls(hpcai_server, base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hpcai-calls")
    env = hpcai_env(base_model[1], hpcai_server.url, hpcai_server.keys["alice"])
    run_hpcai([DRIVER, "calls", HPCAI_SERVED, out], env, timeout=900)
    return json.loads((out / "calls.json").read_text()), out


def test_training_against_formula_and_peft(calls, base_model, tmp_path):
    got, out = calls
    assert got["models"] == [HPCAI_SERVED]
    assert got["info"] == {"rank": 4, "model_name": HPCAI_SERVED, "encode_12": [16, 17]}
    ce = got["ce"]
    assert set(ce["metrics"]) == {"loss:sum"}
    assert ce["metrics"]["loss:sum"] == pytest.approx(-sum(map(sum, ce["logprobs"])), rel=1e-5)
    assert got["grad_norm"] > 0 and got["peft"]["same_archive"]
    with tarfile.open(out / "peft.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        tar.extractall(tmp_path / "peft", filter="data")
    assert gap(got["peft"]["logprobs"], peft_logprobs(base_model[0], tmp_path / "peft", TOKENS[:25])) <= 1e-4


def test_rl_losses(calls):
    """Values against the formulas (the server's default PPO clip); PPO's gradient equals that
    of forward_backward_custom with the formula (same seed, same step -> same adapter)."""
    got, _ = calls
    rl = got["rl"]
    lp, old, adv = (torch.tensor(rl[k], dtype=torch.float32).double() for k in ("lp", "old", "adv"))
    for name in ("importance_sampling", "ppo"):
        want = float(loss_formula(name, lp, old, adv, DEFAULT_CLIP))
        assert rl[name] == pytest.approx(want, rel=1e-4, abs=1e-4), name
    custom = got["custom"]
    assert custom["metrics"]["custom:sum"] == 1.0
    assert gap(custom["a"], custom["b"]) <= 1e-5


def test_sampling(calls):
    got, _ = calls
    s, n = got["sample"], got["sample"]["prompt_len"]
    assert s["tokens"] == s["again"] and len(s["tokens"]) == 3
    assert gap(s["logprobs"], s["training"][n - 1:]) <= ENGINES_ATOL  # the sampler's against the training client's
    assert s["computed"][0] is None and gap(s["logprobs"], s["computed"][n:]) <= 1e-4
    first = s["tokens"][0]
    assert s["stop"] == ["stop", first[:first.index(first[1]) + 1]]  # up to the stop token's first occurrence
    over = got["overwrite"]  # "current" saved again: the same sampling client samples the newest weights
    assert gap(over["after"][1:], over["training"]) <= ENGINES_ATOL and gap(over["before"][1:], over["after"][1:]) > 1e-2
    assert got["samplers"] == [2, 2, 2]


def test_save_load_exact(calls):
    resume = calls[0]["resume"]
    assert gap(resume["from_state"], resume["want"]) <= 1e-6
    assert gap(resume["load_state"], resume["want"]) <= 1e-6


def test_rest_and_async(calls):
    got, _ = calls
    rest = got["rest"]
    tc, s, mid = rest["tc"], rest["s"], rest["mid"]
    assert rest["run"] == [s, HPCAI_SERVED, 4, mid] and rest["by_path"] == s
    assert {tc, s} <= set(rest["runs"])
    assert rest["checkpoints"] == [["current", "sampler", f"hpcai://{tc}/sampler/current"],
                                   ["peft", "sampler", f"hpcai://{tc}/sampler/peft"]]
    assert rest["after_delete"] == [["current"], []]
    assert got["wrapped"] == tc and got["unload"] == tc
    done = got["async"]
    assert done["models"] == [HPCAI_SERVED] and done["rank"] == 2 and done["fwd"] == 24
    prompt_len = got["sample"]["prompt_len"]
    assert (done["sample"], done["computed"], done["runs"], done["listed"]) == (2, prompt_len, True, 2)
    assert done["archives"][0] > 0 and done["archives"][1]
    assert done["run"] == [done["model"]] * 2 and done["left"] == [] and done["unloaded"]
    assert done["resumed"].startswith("hpcai-")


def _tinker_train(service: tinker.ServiceClient, steps: int = 3) -> tuple[str, list[float]]:
    tc = service.create_lora_training_client(base_model=HPCAI_SERVED, rank=4, seed=11).result()
    d = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:24]),
                    loss_fn_inputs={"target_tokens": TOKENS[1:25], "weights": [1.0] * 24})
    for _ in range(steps):
        tc.forward_backward([d], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2, eps=1e-8)).result()
    return tc.model_id, tc.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()


def test_tinker_and_hpcai_at_once(hpcai_server, base_model, tmp_path):
    """Both clients on one key, training at the same time; each adapter equals the one
    trained alone, and the key's usage covers both clients' sessions."""
    key = hpcai_server.keys["bob"]
    env = hpcai_env(base_model[1], hpcai_server.url, key)
    service = tinker.ServiceClient(base_url=hpcai_server.url, api_key=key)
    progress = tmp_path / "progress"
    driver = start_hpcai([DRIVER, "train", HPCAI_SERVED, "together", 6, progress], env)
    while not progress.exists() and driver.poll() is None:  # the hpcai loop is training: start tinker's
        time.sleep(0.2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(together=_tinker_train(service)))
    thread.start()
    thread.join()
    overlapped = len(progress.read_text().split()) < 6
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-5000:]
    together = json.loads(out.strip().splitlines()[-1])
    tinker_model, tinker_alone = _tinker_train(service)
    alone_out = run_hpcai([DRIVER, "train", HPCAI_SERVED, "alone", 6], env, timeout=600)
    alone = json.loads(alone_out.strip().splitlines()[-1])
    assert overlapped
    assert gap(result["together"][1], tinker_alone) <= 1e-6
    assert gap(together["logprobs"], alone["logprobs"]) <= 1e-6

    report = json.loads(hpcai_server.admin("usage", "--key", key))
    (entry,) = report["keys"].values()
    hpcai_session = together["model_id"].split(":")[0]
    sessions = {sid: s["tokens"]["train"] for sid, s in entry["sessions"].items()}
    assert sessions[hpcai_session] == 2 * 6 * 2 * 32  # two runs of 6 steps, two 32-token datums a step
    assert sessions[tinker_model.split(":")[0]] == 2 * 3 * 24
    assert entry["tokens"]["train"] == sum(sessions.values()) and entry["cost"] > 0


# --- the dialect on the wire (raw HTTP) -----------------------------------------------------
class Raw:
    """An hpcai-speaking HTTP client: told apart by its User-Agent, or by the path prefix."""

    def __init__(self, url: str, key: str, prefix: bool = False):
        headers = {"X-API-Key": key} if prefix else {"X-API-Key": key, "User-Agent": "AsyncHpcAI/Python 0.1.5"}
        self.http = httpx.Client(base_url=url + ("/hpcai" if prefix else "") + "/api/v1", headers=headers, timeout=60)

    def post(self, path: str, body: dict, key: str | None = None) -> httpx.Response:
        return self.http.post(path, json=body, headers={"X-Idempotency-Key": key} if key else {})

    def result(self, request_id: str) -> dict:
        while (answer := self.post("/retrieve_future", {"request_id": request_id}).json()).get("type") == "try_again":
            pass
        return answer

    def model(self, key: str | None = None) -> str:
        future = self.post("/create_model", {"base_model": HPCAI_SERVED, "lora_config": {"rank": 2}}, key).json()
        assert self.result(future["request_id"])["model_id"] == future["model_id"]
        return future["model_id"]


def _call(model_id: str, targets=None, dtype: str = "int64", loss_fn: str = "cross_entropy", chunk="encoded_text"):
    targets = targets or list(range(11, 17))
    return {"model_id": model_id, "forward_backward_input": {"loss_fn": loss_fn, "data": [{
        "model_input": {"chunks": [{"type": chunk, "tokens": list(range(10, 16))}]},
        "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": dtype, "shape": [6]},
                           "weights": {"data": [1] * 6, "dtype": "float32", "shape": [6]}}}]}}


def test_wire_routing_idempotency_and_try_again(hpcai_server, base_model):
    url, key = hpcai_server.url, hpcai_server.keys["alice"]
    alice, by_prefix = Raw(url, key), Raw(url, key, prefix=True)
    assert httpx.post(url + "/hpcai/api/v1/create_model", json={"base_model": HPCAI_SERVED}).status_code == 401
    assert Raw(url, "any-key").post("/create_model", {"base_model": HPCAI_SERVED}).status_code == 401
    assert alice.http.get("/healthz").json()["status"] == "ok"
    model = alice.model("create-1")
    assert model.startswith("hpcai-") and alice.model("create-1") == model and by_prefix.model() != model
    plain = httpx.post(url + "/api/v1/forward_backward", json=_call(model), headers={"X-API-Key": key}).json()
    assert alice.result(plain["request_id"])["loss_fn_outputs"][0]["logprobs"]["dtype"] == "float32"
    step = {"model_id": model, "adam_params": {"learning_rate": 1e-3}}
    first = alice.post("/optim_step", step, "step-1").json()
    assert alice.post("/optim_step", step, "step-1").json() == first
    other = alice.post("/optim_step", {**step, "adam_params": {"learning_rate": 1e-2}}, "step-1")
    assert other.status_code == 400 and "another body" in other.text  # never 409: the client retries those
    assert "metrics" in alice.result(first["request_id"])
    # queued behind a (tinker-style) request whose seq_id leaves a gap: answered try_again, never 408
    blocked = alice.model()
    assert httpx.post(url + "/api/v1/optim_step", json={**step, "model_id": blocked, "seq_id": 50},
                      headers={"X-API-Key": key}).status_code == 200
    waiting = alice.post("/optim_step", {**step, "model_id": blocked}).json()
    answer = alice.post("/retrieve_future", {"request_id": waiting["request_id"], "model_id": blocked})
    assert answer.status_code == 200 and answer.json()["type"] == "try_again"
    assert answer.json()["queue_state"] == "active"


def test_wire_isolation_and_refusals(hpcai_server):
    url = hpcai_server.url
    alice, bob = Raw(url, hpcai_server.keys["alice"]), Raw(url, hpcai_server.keys["bob"])
    model = alice.model()
    save = alice.post("/save_weights", {"model_id": model, "path": "mine"}).json()
    path = alice.result(save["request_id"])["path"]
    assert path == f"hpcai://{model}/training/mine"
    for call, body in [("/get_info", {"model_id": model}), ("/forward_backward", _call(model)),
                       ("/optim_step", {"model_id": model, "adam_params": {"learning_rate": 1e-3}}),
                       ("/save_weights", {"model_id": model, "path": "x"}), ("/unload_model", {"model_id": model}),
                       ("/load_weights", {"model_id": bob.model(), "path": path}),
                       ("/asample", {"prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {},
                                     "model_path": path}),
                       ("/retrieve_future", {"request_id": save["request_id"]})]:
        assert bob.post(call, body).status_code == 404, call
    for method, route in [("GET", f"/training_runs/{model}"), ("GET", f"/training_runs/{model}/checkpoints"),
                          ("GET", f"/training_runs/{model}/checkpoints/mine/archive"),
                          ("DELETE", f"/training_runs/{model}/checkpoints/mine")]:
        assert bob.http.request(method, route).status_code == 404, route
    assert model not in [r["training_run_id"] for r in bob.http.get("/training_runs").json()["training_runs"]]
    cases = [(_call(model, targets=[11, 12, 13, 14, 15, 16.5]), 400, "target_tokens"),
             (_call(model, dtype="int32"), 422, "dtype"), (_call(model, chunk="image"), 400, "encoded_text"),
             (_call(model, loss_fn="stable_reinforce"), 400, "importance_sampling"),
             (_call("nope:train:0"), 404, "model_id")]
    for body, status, word in cases:
        response = alice.post("/forward_backward", body)
        assert response.status_code == status and word in response.text, response.text
    assert alice.post("/save_weights", {"model_id": model, "path": "../x"}).status_code == 400
    assert alice.post("/save_weights", {"model_id": model}).status_code == 422
    assert alice.post("/create_model", {"base_model": "unknown/model"}).status_code == 400
    limited = Raw(url, hpcai_server.admin("keys", "create", "carol", "max_models=1"))
    limited.model()
    refused = limited.post("/create_model", {"base_model": HPCAI_SERVED})
    assert refused.status_code == 400 and "at most 1" in refused.text  # a 429 would be retried for minutes
