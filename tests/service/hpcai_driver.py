"""Drives the server with the hpcai SDK; runs in the client's own venv (.venv-hpcai, numpy<2).

    python hpcai_driver.py calls BASE_MODEL OUT_DIR         # every client method; numbers to OUT_DIR/calls.json
    python hpcai_driver.py train BASE_MODEL NAME STEPS [PROGRESS_FILE]   # last line: JSON

``calls`` exercises every ServiceClient, TrainingClient, SamplingClient and RestClient method
(sync and async) and writes what the test checks against independent computations (HF + PEFT
on the downloaded archive, the loss formulas, the training client's own log-probs): this
script asserts nothing about numbers. ``train`` is a deterministic training loop (fixed seed
and data; a checkpoint, sampler save and seeded sample every third step; ``NAME`` saved at the
end) that prints its final path and its adapter's log-probs of a probe datum as a JSON line;
each finished step is appended to PROGRESS_FILE. Uses HPCAI_BASE_URL / HPCAI_API_KEY and survives a server
restart through the client's own retries. Standalone: imports nothing of the project.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import hpcai
import numpy as np
import torch
from hpcai import types

TOKENS = list(range(1000, 1040))
# The recipe's question as the qwen3 renderer writes it ("What is 12 + 34?"): the served base,
# fine-tuned on such prompts, answers in a few tokens ending in <|im_end|>.
PROMPT = [151644, 872, 198, 3838, 374, 220, 16, 17, 488, 220, 18, 19, 30, 151645, 198, 151644, 77091, 198]


def datum(offset: int = 0, n: int = 24, tokens: list[int] | None = None, **inputs) -> types.Datum:
    tok = tokens or [t + offset for t in TOKENS[:n + 1]]
    inputs.setdefault("weights", [1.0] * (len(tok) - 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tok[:-1]),
                       loss_fn_inputs={"target_tokens": tok[1:], **inputs})


def adam(lr: float = 1e-2) -> types.AdamParams:
    return types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)


def lps(output: types.ForwardBackwardOutput, i: int = 0) -> list[float]:
    return list(output.loss_fn_outputs[i]["logprobs"].data)


def forward_lps(tc: hpcai.TrainingClient, d: types.Datum) -> list[float]:
    return lps(tc.forward([d], "cross_entropy").result())


def step(tc: hpcai.TrainingClient, d: types.Datum) -> float:
    tc.forward_backward([d], "cross_entropy").result()
    return tc.optim_step(adam()).result().metrics["grad_norm:mean"]


def ppo_loss(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO with the server's default clip (0.8, 1.2), as a custom loss."""
    total = 0
    for d, lp in zip(data, logprobs):
        old, adv = d.loss_fn_inputs["logprobs"].to_torch(), d.loss_fn_inputs["advantages"].to_torch()
        ratio = torch.exp(lp - old)
        total = total - torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).sum()
    return total, {"custom:sum": 1.0}


def calls(base: str, out_dir: Path) -> None:
    out: dict = {}
    svc = hpcai.ServiceClient()
    rest = svc.create_rest_client()
    out["models"] = [m.model_name for m in svc.get_server_capabilities().supported_models]

    # training, against HF + PEFT (the archive) and the cross-entropy formula
    tc = svc.create_lora_training_client(base_model=base, rank=4, seed=3)
    info = tc.get_info()
    out["info"] = {"rank": info.lora_rank, "model_name": info.model_data.model_name,
                   "encode_12": tc.get_tokenizer().encode("12")}
    ce = tc.forward_backward([datum(), datum(5)], "cross_entropy").result()
    out["ce"] = {"metrics": ce.metrics, "logprobs": [lps(ce, 0), lps(ce, 1)]}
    out["grad_norm"] = tc.optim_step(adam()).result().metrics["grad_norm:mean"]
    peft = tc.save_weights_for_sampler("peft").result().path
    archive = rest.download_checkpoint_archive(tc.model_id, "peft").result()
    (out_dir / "peft.tar.gz").write_bytes(archive)
    out["peft"] = {"path": peft, "logprobs": forward_lps(tc, datum()),
                   "same_archive": rest.download_checkpoint_archive_by_checkpoint_path(peft).result() == archive}

    # RL losses: values on the forward pass; PPO's gradient equals a custom loss's
    lp = np.asarray(forward_lps(tc, datum()))
    rng = np.random.default_rng(1)
    old, adv = (lp + 0.2 * rng.standard_normal(lp.shape)).tolist(), rng.standard_normal(lp.shape).tolist()
    rl = datum(logprobs=old, advantages=adv)  # weights too: the custom loss's forward is a cross_entropy
    out["rl"] = {"lp": lp.tolist(), "old": old, "adv": adv,
                 "importance_sampling": tc.forward([rl], "importance_sampling").result().metrics["loss:sum"],
                 "ppo": tc.forward([rl], "ppo").result().metrics["loss:sum"]}
    a = svc.create_lora_training_client(base_model=base, rank=4, seed=7)
    b = svc.create_lora_training_client(base_model=base, rank=4, seed=7)
    a.forward_backward([rl], "ppo").result()
    custom = b.forward_backward_custom([rl], ppo_loss).result()
    a.optim_step(adam(1e-3)).result()
    b.optim_step(adam(1e-3)).result()
    out["custom"] = {"metrics": custom.metrics, "a": forward_lps(a, datum()), "b": forward_lps(b, datum())}

    # sampling: seeds, stops, the sampler's log-probs against the training client's; a name
    # saved again is sampled with its newest weights
    sc = tc.save_weights_and_get_sampling_client("current")
    params = types.SamplingParams(max_tokens=6, seed=5, temperature=1.0)
    first = sc.sample(types.ModelInput.from_ints(PROMPT), 3, params).result()
    again = sc.sample(types.ModelInput.from_ints(PROMPT), 3, params).result()
    seq = first.sequences[0]
    full = PROMPT + list(seq.tokens)
    stop = sc.sample(types.ModelInput.from_ints(PROMPT), 3, types.SamplingParams(max_tokens=8, seed=5,
                                                                                  stop=[seq.tokens[1]])).result()
    out["sample"] = {"tokens": [list(s.tokens) for s in first.sequences],
                     "again": [list(s.tokens) for s in again.sequences], "logprobs": list(seq.logprobs),
                     "prompt_len": len(PROMPT), "training": forward_lps(tc, datum(tokens=full)),
                     "computed": list(sc.compute_logprobs(types.ModelInput.from_ints(full)).result()),
                     "stop": [stop.sequences[0].stop_reason, list(stop.sequences[0].tokens)]}
    probe = types.ModelInput.from_ints(TOKENS[:12])
    before = sc.compute_logprobs(probe).result()
    step(tc, datum(9))
    tc.save_weights_for_sampler("current").result()
    out["overwrite"] = {"before": before, "after": sc.compute_logprobs(probe).result(),
                        "training": forward_lps(tc, datum(tokens=TOKENS[:12]))}
    by_path = svc.create_sampling_client(model_path=peft, base_model=base)
    from_tc = tc.create_sampling_client(peft)
    on_base = svc.create_sampling_client(base_model=base)
    out["samplers"] = [len(c.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=2))
                           .result().sequences[0].tokens) for c in (by_path, from_tc, on_base)]

    # save and load: a loaded state (weights and optimizer) continues exactly
    s = svc.create_lora_training_client(base_model=base, rank=4, seed=2)
    for i in range(2):
        step(s, datum(i))
    mid = s.save_state("mid").result().path
    step(s, datum(9))
    want = forward_lps(s, datum())
    resumed = svc.create_training_client_from_state(mid)
    step(resumed, datum(9))
    s.load_state(mid).result()
    step(s, datum(9))
    out["resume"] = {"want": want, "from_state": forward_lps(resumed, datum()), "load_state": forward_lps(s, datum())}

    # REST
    run = rest.get_training_run(s.model_id).result()
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    out["rest"] = {
        "run": [run.training_run_id, run.base_model, run.lora_rank, run.last_checkpoint.checkpoint_path],
        "by_path": rest.get_training_run_by_checkpoint_path(mid).result().training_run_id,
        "runs": [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs],
        "checkpoints": sorted([c.checkpoint_id, c.checkpoint_type, c.checkpoint_path] for c in listed),
        "tc": tc.model_id, "s": s.model_id, "mid": mid}
    rest.delete_checkpoint(tc.model_id, "peft").result()
    rest.delete_checkpoint_by_checkpoint_path(mid).result()
    out["rest"]["after_delete"] = [sorted(c.checkpoint_id for c in rest.list_checkpoints(m).result().checkpoints)
                                   for m in (tc.model_id, s.model_id)]
    out["wrapped"] = svc.create_training_client(tc.model_id, base_model=base).get_info().model_id
    out["unload"] = tc.unload_model().result().model_id
    out["async"] = asyncio.run(async_calls(svc, rest, base))
    (out_dir / "calls.json").write_text(json.dumps(out))


async def async_calls(svc: hpcai.ServiceClient, rest, base: str) -> dict:
    """Every async variant once, on one model."""
    models = (await svc.get_server_capabilities_async()).supported_models
    tc = await svc.create_lora_training_client_async(base_model=base, rank=2, seed=4)
    info = await tc.get_info_async()
    fwd = await (await tc.forward_async([datum()], "cross_entropy")).result_async()
    await (await tc.forward_backward_async([datum()], "cross_entropy")).result_async()
    await (await tc.forward_backward_custom_async([datum()], lambda d, lp: ((-lp[0]).sum(), {}))).result_async()
    await (await tc.optim_step_async(adam())).result_async()
    state = (await (await tc.save_state_async("async")).result_async()).path
    await (await tc.load_state_async(state)).result_async()
    sampler = (await (await tc.save_weights_for_sampler_async("async")).result_async()).path
    sc = await tc.save_weights_and_get_sampling_client_async("async")
    sample = await sc.sample_async(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=2))
    computed = await sc.compute_logprobs_async(types.ModelInput.from_ints(PROMPT))
    resumed = await svc.create_training_client_from_state_async(state)
    runs = (await rest.list_training_runs_async(limit=100)).training_runs
    listed = (await rest.list_checkpoints_async(tc.model_id)).checkpoints
    archive = await rest.download_checkpoint_archive_async(tc.model_id, "async")
    by_path = await rest.download_checkpoint_archive_by_checkpoint_path_async(sampler)
    run = await rest.get_training_run_async(tc.model_id)
    by_ckpt = await rest.get_training_run_by_checkpoint_path_async(state)
    await rest.delete_checkpoint_async(tc.model_id, "training/async")
    await rest.delete_checkpoint_by_checkpoint_path_async(sampler)
    left = (await rest.list_checkpoints_async(tc.model_id)).checkpoints
    unloaded = await (await tc.unload_model_async()).result_async()
    return {"models": [m.model_name for m in models], "rank": info.lora_rank, "fwd": len(lps(fwd)),
            "sample": len(sample.sequences[0].tokens), "computed": len(computed), "resumed": resumed.model_id,
            "runs": tc.model_id in [r.training_run_id for r in runs], "listed": len(listed),
            "archives": [len(archive), archive == by_path], "run": [run.training_run_id, by_ckpt.training_run_id],
            "left": [c.checkpoint_id for c in left], "unloaded": unloaded.model_id == tc.model_id,
            "model": tc.model_id}


def train(base: str, name: str, steps: int, progress: Path | None) -> None:
    svc = hpcai.ServiceClient()
    tc = svc.create_lora_training_client(base_model=base, rank=4, seed=5, train_mlp=True)
    for i in range(steps):
        tokens = [(100 + 37 * i + 11 * j) % 5000 for j in range(33)]
        tc.forward_backward([datum(tokens=tokens), datum(tokens=[t + 1000 for t in tokens])], "cross_entropy").result()
        tc.optim_step(adam()).result()
        if i % 3 == 2:
            tc.save_state(f"{name}-{i}").result()
            sampler = tc.save_weights_and_get_sampling_client("sampler")
            params = types.SamplingParams(max_tokens=3, seed=i)
            sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2, params).result()
        if progress is not None:
            with progress.open("a") as f:
                f.write(f"{i}\n")
    path = tc.save_state(name).result().path
    print(json.dumps({"path": path, "model_id": tc.model_id, "logprobs": forward_lps(tc, datum())}), flush=True)


if __name__ == "__main__":
    scenario, base_model, *rest_args = sys.argv[1:]
    if scenario == "calls":
        calls(base_model, Path(rest_args[0]))
    else:
        train(base_model, rest_args[0], int(rest_args[1]), Path(rest_args[2]) if len(rest_args) > 2 else None)
