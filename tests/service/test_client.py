"""The official tinker client against the real server: every TrainingClient, SamplingClient
and RestClient call the service serves, and the numbers against independent computations
(HF + PEFT in this process, the loss formulas, the sampler's own log-probs)."""

from __future__ import annotations

import base64
import json
import os
import threading
import urllib.request

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.service.references import loss_formula, peft_logprobs
from tests.service.server_proc import SERVED

pytestmark = pytest.mark.slow  # about 3.5 minutes on 2 cores
TOKENS = list(range(1000, 1040))
# The recipe's question as the qwen3 renderer writes it ("What is 12 + 34?"): the served base,
# fine-tuned on such prompts, answers in a few tokens ending in <|im_end|>.
PROMPT = [151644, 872, 198, 3838, 374, 220, 16, 17, 488, 220, 18, 19, 30, 151645, 198, 151644, 77091, 198]


def datum(offset: int = 0, n: int = 24, weights=None, **extra) -> types.Datum:
    tok = [t + offset for t in TOKENS[:n + 1]]
    inputs = {"target_tokens": tok[1:], "weights": weights if weights is not None else [1.0] * n, **extra}
    return types.Datum(model_input=types.ModelInput.from_ints(tok[:-1]), loss_fn_inputs=inputs)


@pytest.fixture(scope="module")
def service(server, base_model):
    os.environ.update(HF_HOME=str(base_model[1]), HF_HUB_OFFLINE="1", TINKER_TELEMETRY="0")
    return tinker.ServiceClient(base_url=server.url, api_key=server.keys["alice"])


def lp_of(output) -> np.ndarray:
    return np.asarray(output["logprobs"].tolist(), dtype=np.float64)


def adam(lr=1e-2):
    return types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)


def test_training_round_trip_and_peft_parity(service, server, base_model, tmp_path):
    tc = service.create_lora_training_client(base_model=SERVED, rank=4, seed=3).result()
    info = tc.get_info()
    assert info.model_data.tokenizer_id and info.lora_rank == 4
    assert tc.get_tokenizer().encode("12") == [16, 17]
    out = tc.forward_backward([datum(), datum(5)], "cross_entropy").result()
    assert set(out.metrics) == {"loss:sum"}
    assert out.metrics["loss:sum"] == pytest.approx(-(lp_of(out.loss_fn_outputs[0]).sum()
                                                      + lp_of(out.loss_fn_outputs[1]).sum()), rel=1e-5)
    tc.optim_step(adam()).result()
    export = tc.save_weights_external("export1").result().path
    rest = service.create_rest_client()
    urls = rest.get_external_weights_urls(export).result()
    target = tmp_path / "peft"
    target.mkdir()
    for name, url in urls.urls.items():
        urllib.request.urlretrieve(url, target / name)
    served = lp_of(tc.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    assert np.abs(served - peft_logprobs(base_model[0], target, TOKENS[:25])).max() <= 1e-4


@pytest.mark.parametrize("loss_fn,cfg", [("importance_sampling", {}), ("ppo", {"clip_low_threshold": 0.9,
                                          "clip_high_threshold": 1.1}), ("cispo", {"clip_low_threshold": 0.9,
                                          "clip_high_threshold": 1.1}), ("dro", {"beta": 0.5})])
def test_rl_loss_value_and_gradient(service, loss_fn, cfg):
    """loss:sum equals the formula on the served log-probs; the gradient equals that of
    cross_entropy with weights -dL/dlp (same seed, same AdamW step -> same adapter)."""
    a = service.create_lora_training_client(base_model=SERVED, rank=4, seed=7).result()
    b = service.create_lora_training_client(base_model=SERVED, rank=4, seed=7).result()
    lp = torch.tensor(lp_of(a.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]))
    gen = torch.Generator().manual_seed(1)
    old = lp + 0.2 * torch.randn(lp.shape, generator=gen, dtype=lp.dtype)
    adv = torch.randn(lp.shape, generator=gen, dtype=lp.dtype)
    rl = datum(logprobs=old.float().tolist(), advantages=adv.float().tolist())
    rl = types.Datum(model_input=rl.model_input, loss_fn_inputs={k: v for k, v in rl.loss_fn_inputs.items()
                                                                  if k != "weights"})
    out = a.forward_backward([rl], loss_fn, cfg).result()
    leaf = lp.clone().requires_grad_(True)
    loss = loss_formula(loss_fn, leaf, old.float().double(), adv.float().double(), cfg)
    loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(float(loss), rel=1e-4, abs=1e-4)
    b.forward_backward([datum(weights=(-leaf.grad).float().tolist())], "cross_entropy").result()
    na = a.optim_step(adam(1e-3)).result().metrics["grad_norm:mean"]
    nb = b.optim_step(adam(1e-3)).result().metrics["grad_norm:mean"]
    assert na == pytest.approx(nb, rel=1e-4)
    la = lp_of(a.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    lb = lp_of(b.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    assert np.abs(la - lb).max() <= 1e-5


def test_custom_loss_and_unsupported_loss(service):
    tc = service.create_lora_training_client(base_model=SERVED, rank=2).result()
    out = tc.forward_backward_custom([datum()], lambda data, lps: (-(lps[0] * 2.0).sum(), {"x": 1.0})).result()
    assert out.metrics["x"] == 1.0
    with pytest.raises(tinker.BadRequestError, match="importance_sampling"):
        tc.forward_backward([datum()], "stable_reinforce").result()
    tc.optim_step(adam()).result()  # the refused call held its seq_id: later calls still run


def test_sampling_logprobs_match_compute_logprobs(service):
    tc = service.create_lora_training_client(base_model=SERVED, rank=4, seed=1).result()
    tc.forward_backward([datum()], "cross_entropy").result()
    tc.optim_step(adam()).result()
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(PROMPT)
    res = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=6, seed=5, temperature=1.0)).result()
    again = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=6, seed=5, temperature=1.0)).result()
    assert [s.tokens for s in res.sequences] == [s.tokens for s in again.sequences]
    for seq in res.sequences:
        full = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT + list(seq.tokens))).result()
        assert np.abs(np.array(full[len(PROMPT):]) - np.array(seq.logprobs)).max() <= 1e-4
    stopped = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=8, seed=5,
                                                             stop=[res.sequences[0].tokens[1]])).result()
    first = res.sequences[0].tokens
    assert stopped.sequences[0].stop_reason == "stop"
    assert stopped.sequences[0].tokens == first[:first.index(first[1]) + 1]  # up to the stop token's first occurrence
    named = tc.save_weights_for_sampler("named").result().path
    by_path = service.create_sampling_client(model_path=named)
    assert by_path.get_base_model() == SERVED
    base = service.create_sampling_client(base_model=SERVED)
    assert len(base.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences[0].tokens) == 2
    topk = base.sample(prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                       topk_prompt_logprobs=3).result()
    assert topk.prompt_logprobs[0] is None and len(topk.prompt_logprobs) == len(PROMPT)


def test_save_load_with_optimizer_continues_exactly(service):
    tc = service.create_lora_training_client(base_model=SERVED, rank=4, seed=2).result()
    for step in range(2):
        tc.forward_backward([datum(step)], "cross_entropy").result()
        tc.optim_step(adam()).result()
    state = tc.save_state("mid").result().path
    tc.forward_backward([datum(9)], "cross_entropy").result()
    tc.optim_step(adam()).result()
    want = lp_of(tc.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    resumed = service.create_training_client_from_state_with_optimizer(state)
    resumed.forward_backward([datum(9)], "cross_entropy").result()
    resumed.optim_step(adam()).result()
    got = lp_of(resumed.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    assert np.abs(got - want).max() <= 1e-6
    weights_only = service.create_training_client_from_state(state)
    tc.load_state(state).result()
    tc.load_state_with_optimizer(state).result()
    assert weights_only.get_info().lora_rank == 4


def test_two_adapters_concurrently_equal_each_alone(service):
    def train(client, offset, steps=3):
        for step in range(steps):
            client.forward_backward([datum(offset + step)], "cross_entropy").result()
            client.optim_step(adam()).result()

    a = service.create_lora_training_client(base_model=SERVED, rank=4, seed=11).result()
    b = service.create_lora_training_client(base_model=SERVED, rank=8, seed=12).result()
    threads = [threading.Thread(target=train, args=(a, 0)), threading.Thread(target=train, args=(b, 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = service.create_lora_training_client(base_model=SERVED, rank=4, seed=11).result()
    train(alone, 0)
    la = lp_of(a.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    lo = lp_of(alone.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    assert np.abs(la - lo).max() <= 1e-6


def test_rest_client(service, server):
    tc = service.create_lora_training_client(base_model=SERVED, rank=2, user_metadata={"renderer_name": "qwen3"})
    tc = tc.result()
    path = tc.save_state("r1").result().path
    rest = service.create_rest_client()
    run = rest.get_training_run(tc.model_id).result()
    assert run.user_metadata == {"renderer_name": "qwen3"} and run.last_checkpoint.tinker_path == path
    assert rest.get_training_run_by_tinker_path(path).result().training_run_id == tc.model_id
    assert rest.get_weights_info_by_tinker_path(path).result().lora_rank == 2
    assert any(r.training_run_id == tc.model_id for r in rest.list_training_runs(limit=100).result().training_runs)
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [path]
    assert path in [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    rest.publish_checkpoint_from_tinker_path(path).result()
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    session = rest.get_session(tc.model_id.split(":")[0]).result()
    assert tc.model_id in session.training_run_ids
    assert session_in(rest)
    sampler = tc.save_weights_and_get_sampling_client()
    sampler_id = json.loads(base64.b64decode(sampler.get_sampler_handle()))["sampling_session_id"]
    assert rest.get_sampler(sampler_id).result().base_model == SERVED
    rest.delete_checkpoint_from_tinker_path(path).result()
    assert path not in [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run("nope:train:0").result()
    assert [m.model_name for m in service.get_server_capabilities().supported_models] == [SERVED]


def session_in(rest) -> bool:
    return len(rest.list_sessions().result().sessions) >= 1


def test_a_non_finite_step_is_refused_and_the_adapter_kept(service):
    """Finite weights whose loss overflows fp32: optim_step answers with an error and the
    adapter stays as it was (non-finite inputs are refused before they run)."""
    tc = service.create_lora_training_client(base_model=SERVED, rank=2, seed=4).result()
    tc.forward_backward([datum()], "cross_entropy").result()
    tc.optim_step(adam()).result()
    before = lp_of(tc.forward([datum()], "cross_entropy").result().loss_fn_outputs[0])
    tc.forward_backward([datum(weights=[1e38] * 24)], "cross_entropy").result()
    with pytest.raises(tinker.TinkerError, match="not finite; the adapter is unchanged"):
        tc.optim_step(adam()).result()
    np.testing.assert_array_equal(lp_of(tc.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]), before)
    tc.forward_backward([datum()], "cross_entropy").result()
    tc.optim_step(adam()).result()  # and the adapter trains on
    assert not np.array_equal(lp_of(tc.forward([datum()], "cross_entropy").result().loss_fn_outputs[0]), before)
