"""Benchmark: the Tinker-compatible service vs the same work on its fleets directly.

On the embedded tiny base (built into ``--work``), in phases that never share the CPU:

1. ``direct``: the math_rl-shaped RL step of ``scripts/service_rl_step.py`` called on a
   ``FleetBackend`` in this process (create_adapter, sample, forward_backward, optim_step,
   save_state for the sampler weights); then Ray is shut down, which frees its placement,
   before the server starts.
2. ``server``: the same steps through ``scripts/serve.py`` with the official tinker client,
   the G x B samples of a step issued at once. The scheduler's counters
   (``/api/v1/healthz``) before and after give the sample requests per engine call.
3. ``concurrency`` (same server): C clients each training its own adapter (K rounds of
   forward_backward(cross_entropy) + optim_step) in C threads at once, vs the same clients one
   after another; aggregate train tokens/s of both (alternated, ``--repeats`` times each).
4. ``switch`` (same server): calls in the order A A B B ..., so that every other call follows
   a call on the other adapter; the switch cost is the median difference between such a call
   and the next one (which follows a call on the same adapter). Once for forward_backward on
   two adapters, once for sampling with two samplers' weights (a switch loads the other
   weights and pushes them, merged into the base, into vLLM).

Per-step seconds are the median and spread of the steps after the warm-up; the target for
server / direct is <= 1.3. Figures only (no asserts), written as JSON with the settings and the
load average at the start and end.

    .venv/bin/python scripts/bench_service.py --out bench_results/service.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.service_rl_step import (DirectSteps, ServerSteps, StepSettings, problems, run_steps,  # noqa: E402
                                     spread)
from tests.service.server_proc import SERVED, ServerProcess, build_base, client_env  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's size: the RL step's shape, how many steps, clients, rounds and switches."""

    step: StepSettings = StepSettings()
    warmup: int = 2  # RL steps before the measured ones
    steps: int = 8
    clients: int = 4
    rounds: int = 2  # forward_backward + optim_step per client, per repeat
    repeats: int = 2  # of each of "one after another" and "at once", alternated
    datums: int = 16  # per forward_backward of the concurrency phase (the fleet computes 16-row micro-batches)
    datum_tokens: int = 32
    switches: int = 6  # A A B B repetitions of the switch phase
    switch_tokens: int = 8  # its forward_backward: one datum this long (short calls: less noise)


def timed(call: Callable[[], object]) -> float:
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def measured(phase: Callable[[], dict]) -> dict:
    """The phase's figures and its wall time (``phase_s``)."""
    begin = time.perf_counter()
    out = phase()
    out["phase_s"] = time.perf_counter() - begin
    return out


def direct_phase(settings: Settings, model_dir: Path, tokenizer, work: Path) -> dict:
    from trainers.service.fleet_backend import FleetBackend

    begin = time.perf_counter()
    backend = FleetBackend({SERVED: str(model_dir)})
    startup = time.perf_counter() - begin
    try:
        steps = DirectSteps(backend, SERVED, settings.step, work / "direct")
        result = run_steps(steps, tokenizer, settings.step, settings.warmup, settings.steps)
    finally:
        shutdown = timed(shutdown_ray)
    return {"startup_s": startup, **result, "shutdown_s": shutdown}


def shutdown_ray() -> None:
    """Stops the local Ray instance (its placement group goes with it) and waits until every
    process it started has exited, so that none of them shares the CPU with the server."""
    import psutil
    import ray

    started = psutil.Process().children(recursive=True)
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=60)
    for proc in alive:
        proc.kill()


def scheduler_stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/v1/healthz") as response:
        return json.load(response)["scheduler"]


def server_steps(settings: Settings, service, url: str, tokenizer) -> dict:
    steps = ServerSteps(service, SERVED, settings.step)
    before = scheduler_stats(url)
    result = run_steps(steps, tokenizer, settings.step, settings.warmup, settings.steps)
    after = scheduler_stats(url)
    calls = after["sample_calls"] - before["sample_calls"]
    requests = after["sample_requests"] - before["sample_requests"]
    result["batching"] = {"requests_issued_at_once": settings.step.groups * settings.step.group_size,
                          "sample_requests": requests, "sample_calls": calls,
                          "requests_per_call": requests / calls if calls else None,
                          "calls_per_step": calls / (settings.warmup + settings.steps),
                          "scheduler_before": before, "scheduler_after": after}
    return result


def train_data(client: int, datums: int, length: int) -> list:
    """``datums`` cross_entropy datums of ``length`` tokens, different per client."""
    from tinker import types

    out = []
    for d in range(datums):
        first = 1000 + 997 * client + 131 * d
        tokens = [first + (37 * i) % 5000 for i in range(length + 1)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length}))
    return out


def train_rounds(client, data: list, rounds: int, learning_rate: float) -> None:
    from tinker import types

    for _ in range(rounds):
        backward = client.forward_backward(data, "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=learning_rate))
        backward.result()
        step.result()


def concurrency_phase(settings: Settings, clients: list, data: list[list]) -> dict:
    lr = settings.step.learning_rate

    def one_after_another() -> None:
        for client, datums in zip(clients, data):
            train_rounds(client, datums, settings.rounds, lr)

    def at_once() -> None:
        threads = [threading.Thread(target=train_rounds, args=(client, datums, settings.rounds, lr))
                   for client, datums in zip(clients, data)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    for client, datums in zip(clients, data):  # warm-up: every adapter created, resident and stepped once
        train_rounds(client, datums, 1, lr)
    modes = {"one_after_another": one_after_another, "at_once": at_once}
    walls: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(settings.repeats):
        for mode in sorted(modes, reverse=bool(repeat % 2)):  # either order, in turn
            walls[mode].append(timed(modes[mode]))
    tokens = len(clients) * settings.rounds * settings.datums * settings.datum_tokens
    out = {"train_tokens_per_repeat": tokens}
    for mode, seconds in walls.items():
        out[mode] = {"wall_s": [round(s, 4) for s in seconds], "tokens_per_s": tokens / statistics.median(seconds)}
    out["ratio_at_once_vs_one_after_another"] = (out["at_once"]["tokens_per_s"]
                                                 / out["one_after_another"]["tokens_per_s"])
    return out


def switch_cost(calls: tuple[Callable[[], object], Callable[[], object]], reps: int) -> dict:
    """Seconds of calls that follow a call on the other target vs on the same one (A A B B ...);
    the cost is the median difference of each such pair."""
    for call in calls:
        call()
    switched, same = [], []
    for _ in range(reps):
        for call in calls:
            switched.append(timed(call))
            same.append(timed(call))
    paired = [a - b for a, b in zip(switched, same)]  # neighbours in time: the machine's load cancels
    return {"after_other_s": spread(switched), "after_same_s": spread(same), "difference_s": spread(paired),
            "switch_cost_s": statistics.median(paired)}


def switch_phase(settings: Settings, clients: list, tokenizer) -> dict:
    from tinker import types

    a, b = clients[:2]
    data = [train_data(i, 1, settings.switch_tokens) for i in range(2)]
    backward = switch_cost((lambda: a.forward_backward(data[0], "cross_entropy").result(),
                            lambda: b.forward_backward(data[1], "cross_entropy").result()), settings.switches)
    samplers = [c.save_weights_and_get_sampling_client().result() for c in (a, b)]
    prompt = types.ModelInput.from_ints(list(problems(tokenizer, 0, 1)[0].prompt))
    params = types.SamplingParams(max_tokens=settings.step.max_tokens, temperature=settings.step.temperature)
    sample = switch_cost(tuple(lambda s=s: s.sample(prompt, 1, params).result() for s in samplers), settings.switches)
    return {"forward_backward": backward, "sample": sample}


def server_phase(settings: Settings, model_dir: Path, hf_home: Path, tokenizer, work: Path) -> dict:
    import tinker

    state = work / "server"
    shutil.rmtree(state, ignore_errors=True)
    server = ServerProcess(state, model_dir)
    begin = time.perf_counter()
    url = server.start()
    startup = time.perf_counter() - begin
    try:
        os.environ.update(client_env(hf_home, url, server.admin("keys", "create", "bench")))
        service = tinker.ServiceClient()
        out: dict = {"startup_s": startup, "steps": measured(lambda: server_steps(settings, service, url, tokenizer))}
        clients = [service.create_lora_training_client(base_model=SERVED, rank=settings.step.lora_rank, seed=i).result()
                   for i in range(settings.clients)]
        data = [train_data(i, settings.datums, settings.datum_tokens) for i in range(settings.clients)]
        out["concurrency"] = measured(lambda: concurrency_phase(settings, clients, data))
        out["switch"] = measured(lambda: switch_phase(settings, clients, tokenizer))
        return out
    finally:
        server.stop()


def parse() -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/service.json")
    parser.add_argument("--work", default="outputs/bench-service")
    for cls in (StepSettings, Settings):
        for f in dataclasses.fields(cls):
            if f.name != "step":
                parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args()
    step = StepSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StepSettings)})
    rest = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if f.name != "step"}
    return args, Settings(step=step, **rest)


def main() -> None:
    from transformers import AutoTokenizer

    args, settings = parse()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "direct", ignore_errors=True)
    model_dir, hf_home = build_base(work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result: dict = {"settings": dataclasses.asdict(settings), "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg()}
    result["direct"] = measured(lambda: direct_phase(settings, model_dir, tokenizer, work))
    result["server"] = measured(lambda: server_phase(settings, model_dir, hf_home, tokenizer, work))
    result["load_average_at_end"] = os.getloadavg()
    server, direct = result["server"]["steps"]["step_s"]["median"], result["direct"]["step_s"]["median"]
    result["figures"] = {
        "step_s_direct_median": direct, "step_s_server_median": server, "ratio_server_vs_direct": server / direct,
        "requests_per_sample_call": result["server"]["steps"]["batching"]["requests_per_call"],
        "train_tokens_per_s_at_once": result["server"]["concurrency"]["at_once"]["tokens_per_s"],
        "train_tokens_per_s_one_after_another": result["server"]["concurrency"]["one_after_another"]["tokens_per_s"],
        "ratio_at_once_vs_one_after_another": result["server"]["concurrency"]["ratio_at_once_vs_one_after_another"],
        "switch_cost_s_forward_backward": result["server"]["switch"]["forward_backward"]["switch_cost_s"],
        "switch_cost_s_sample": result["server"]["switch"]["sample"]["switch_cost_s"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["figures"], indent=2))


if __name__ == "__main__":
    main()
