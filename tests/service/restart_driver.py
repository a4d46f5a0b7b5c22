"""A deterministic training loop through the official client, for the SIGKILL-restart test.

    python tests/service/restart_driver.py NAME STEPS PROGRESS_FILE

Trains one adapter (fixed seed and data), samples with a fixed seed each step, saves a
checkpoint every third step and ``NAME`` at the end; appends each finished step to
PROGRESS_FILE. Uses TINKER_BASE_URL / TINKER_API_KEY; survives a server restart through the
client's own retries.
"""

from __future__ import annotations

import sys

import tinker
from tinker import types

from tests.service.server_proc import SERVED


def datum(step: int) -> types.Datum:
    tokens = [(100 + 37 * step + 11 * i) % 5000 for i in range(33)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 32})


def main(name: str, steps: int, progress: str) -> None:
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(base_model=SERVED, rank=4, seed=5).result()
    params = types.AdamParams(learning_rate=1e-2, eps=1e-8)
    for step in range(steps):
        fb = tc.forward_backward([datum(step), datum(step + 1000)], "cross_entropy")
        fb.result()
        tc.optim_step(params).result()
        if step % 3 == 2:
            tc.save_state(f"{name}-{step}").result()
            sampler = tc.save_weights_and_get_sampling_client()
            sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=3, seed=step)).result()
        with open(progress, "a") as f:
            f.write(f"{step}\n")
    print(tc.save_state(name).result().path, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
