"""The main job: GRPO with LoRA on a MoE model, the two fleets on Ray.

``run(tree)`` takes the composed Hydra config as a plain dict: it prepares the base model,
validates the whole configuration against it (before any actor starts), places and starts
the fleets, resumes from the newest complete checkpoint when asked, runs the steps with
periodic evaluation and checkpoints, exports the final adapter and reports where
everything is.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from parallel.arch import get_arch
from parallel.topology import validate_layout
from rlcore.rewards import get_reward
from rlcore.validation import ConfigError
from rlcore.tasks import Problem, arithmetic_problems, load_prompt_jsonl
from rollout.fleet import EngineError, RolloutFleet
from rollout.seeding import spread_seed
from rollout.sync import make_weight_sync
from scripts.make_tiny_model import TinyModelSpec, make_tiny_model
from trainers.checkpointing import CheckpointManager, capture_rng_state, restore_rng_state, write_json_atomic
from trainers.config import RunConfig
from trainers.evaluation import evaluate
from trainers.grpo import GRPOStep, StepSettings
from trainers.placement import place_fleets, start_ray
from trainers.sft import finetune_base
from trainers.tracking import MetricsTracker
from trainers.training_fleet import TrainingFleet, TrainingFleetSpec, TrainingRankDied

ENGINE_RETRIES = 2


def base_model_dir(tree: dict) -> Path:
    """The HF checkpoint the run starts from: the given one, or the tiny model (made if absent)."""
    model = tree.get("model", {})
    if model.get("hf_path"):
        return Path(model["hf_path"])
    spec = TinyModelSpec(**model.get("tiny", {}))
    key = "-".join(f"{v}" for v in asdict(spec).values())
    out = Path(model.get("cache_dir", "outputs/cache")) / f"tiny-{key}"
    if not (out / "model.safetensors").is_file():
        make_tiny_model(out, spec)
    return out


def validate(tree: dict, base_dir: Path) -> RunConfig:
    """Every group, then the checks across groups; raises ConfigError naming the field."""
    from transformers import AutoConfig

    rollout = dict(tree.get("rollout", {}))
    rollout["engine"] = {**rollout.get("engine", {})}
    rollout["engine"]["model"] = rollout["engine"].get("model") or str(base_dir)
    cfg = RunConfig.from_dict({**tree, "rollout": rollout})
    if cfg.algorithm.entropy_coef > 0:
        raise ConfigError("algorithm.entropy_coef", cfg.algorithm.entropy_coef,
                          "must be 0: the training fleet's loss does not see token entropy yet")
    hf_config = AutoConfig.from_pretrained(base_dir)
    try:
        validate_layout(cfg.parallel, cfg.trainer.train_world_size, get_arch(hf_config).model_dims(hf_config))
    except ConfigError as err:
        if err.field == "world_size":  # the layout's world is the training fleet's size
            raise ConfigError("trainer.train_world_size", err.value, err.allowed) from None
        raise
    return cfg


class PromptSource:
    """Training prompts per step (a pure function of seed and step) and the held-out set."""

    def __init__(self, cfg: RunConfig, log):
        self.cfg = cfg
        self.rows: list[Problem] | None = None
        if cfg.task.name == "jsonl":
            self.rows = self._load(cfg.task.train_jsonl, log)
            self.heldout = self._load(cfg.task.heldout_jsonl, log)[: cfg.task.heldout_size]
        else:
            self.heldout = arithmetic_problems(cfg.task.heldout_size, seed=cfg.trainer.seed, split="heldout",
                                               difficulty=cfg.task.difficulty)

    @staticmethod
    def _load(path: str, log) -> list[Problem]:
        problems, issues = load_prompt_jsonl(path)
        for issue in issues:
            log(f"{path}: skipped {issue}")
        return problems

    def for_step(self, step: int) -> list[Problem]:
        n, seed = self.cfg.trainer.prompts_per_step, self.cfg.trainer.seed
        if self.rows is None:
            return arithmetic_problems(n, seed=spread_seed(seed, step), split="train", difficulty=self.cfg.task.difficulty)
        order = list(range(len(self.rows)))
        start = (step - 1) * n
        picked = []
        for position in range(start, start + n):
            epoch, index = divmod(position, len(self.rows))
            random.Random(spread_seed(seed, epoch)).shuffle(order)
            picked.append(self.rows[order[index]])
        return picked


def with_engine_recovery(rollout: RolloutFleet, call, log):
    """Runs ``call``; a rollout engine that dies is restarted (with the current weights) and
    the call retried, up to ENGINE_RETRIES times."""
    for attempt in range(ENGINE_RETRIES + 1):
        try:
            return call()
        except EngineError as err:
            if attempt == ENGINE_RETRIES:
                raise
            log(f"{err}; restarting engine {err.index} and retrying")
            rollout.restart_engine(err.index)


def run(tree: dict, log=print) -> dict:
    base_dir = base_model_dir(tree)
    cfg = validate(tree, base_dir)
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    torch.manual_seed(cfg.trainer.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    start_ray(cfg.trainer.ray_address)
    # Training ranks run on CPU (gloo) for now: the module that decides the device passes
    # train_gpus_per_rank=1 on CUDA.
    placement = place_fleets(cfg.trainer.train_world_size, cfg.rollout.engines, cfg.trainer.placement,
                             engine_gpus=cfg.rollout.num_gpus_per_engine)
    log(placement.describe())
    model_dir = finetune_base(cfg, base_dir, tokenizer, placement, log) if cfg.model.sft_steps else base_dir

    training = TrainingFleet(TrainingFleetSpec(str(model_dir), cfg.parallel, cfg.lora, cfg.trainer.train_world_size,
                                               cfg.trainer.micro_batch_size, cfg.trainer.seed), placement)
    log(f"training fleet: {cfg.trainer.train_world_size} Megatron ranks, process ids by rank {training.pids}")
    rollout_cfg = replace(cfg.rollout, engine=replace(cfg.rollout.engine, model=str(model_dir)),
                          num_cpus_per_engine=placement.plan.engine_cpus)
    rollout = RolloutFleet(rollout_cfg, placement.group, placement.plan.engine_bundles, placement.plan.engine_gpus)
    sync = make_weight_sync(rollout)
    checkpoints = CheckpointManager(run_dir, cfg.trainer.keep_checkpoints)
    latest = checkpoints.latest() if cfg.trainer.resume == "auto" else None
    start_step = 1
    if latest is not None:
        training.load_state(str(latest.path / "train"))
        state = torch.load(latest.path / "trainer_state.pt", weights_only=False)
        restore_rng_state(state["rng"])
        start_step = state["next_step"]
        # Re-publish the checkpoint's policy under the version number it had, so versions
        # carried by samples continue as in an uninterrupted run.
        rollout.version = state["policy_version"] - 1
        with_engine_recovery(rollout, lambda: sync.push(training), log)
        log(f"resumed from {latest.path} at step {start_step}")
    tracker = MetricsTracker(run_dir, cfg.logger, cfg.to_dict(), resume_step=latest.step if latest else None)
    prompts = PromptSource(cfg, log)
    reward_fn = get_reward(cfg.algorithm.reward)
    t = cfg.trainer

    def run_eval() -> dict[str, float]:
        return with_engine_recovery(rollout, lambda: evaluate(
            rollout, tokenizer, prompts.heldout, cfg.sampling, reward_fn, t.seed, t.reward_timeout_s,
            t.reward_workers), log)

    step_runner = GRPOStep(StepSettings(
        cfg.algorithm, cfg.sampling, t.samples_per_prompt, t.ppo_epochs, t.mini_batch_prompts, t.lr, t.betas,
        t.weight_decay, t.grad_clip, t.seed, t.reward_timeout_s, t.reward_workers), rollout, training, sync, tokenizer,
        recover=lambda call: with_engine_recovery(rollout, call, log))
    try:
        if start_step == 1:
            tracker.log(0, run_eval())
        for step in range(start_step, t.steps + 1):
            metrics = step_runner.run(prompts.for_step(step), step)
            if step % t.eval_every == 0 or step == t.steps:
                metrics.update(run_eval())
            tracker.log(step, metrics)
            if step % t.checkpoint_every == 0 or step == t.steps:
                def write(tmp: Path, step=step) -> None:
                    training.save_state(str(tmp / "train"))
                    torch.save({"next_step": step + 1, "step": step, "rng": capture_rng_state(),
                                "policy_version": rollout.version}, tmp / "trainer_state.pt")
                checkpoints.save(step, write)
    except TrainingRankDied as err:
        newest = checkpoints.latest()
        where = f"step {newest.step} ({newest.path})" if newest else "none yet"
        log(f"\nERROR: {err}.\nThe run stopped. Newest complete checkpoint: {where}.\n"
            f"Resume with the same command and trainer.resume=auto trainer.run_dir={run_dir}")
        rollout.shutdown()
        raise SystemExit(1) from None
    adapter_dir = run_dir / "adapter"
    training.export_peft_adapter(str(adapter_dir))
    tracker.finish()
    rows = tracker.rows()
    summary = summarize(rows, run_dir, adapter_dir, tracker)
    write_json_atomic(run_dir / "summary.json", summary)
    step_runner.close()
    sync.close()
    rollout.shutdown()
    training.shutdown()
    return summary


def summarize(rows: list[dict], run_dir: Path, adapter_dir: Path, tracker: MetricsTracker) -> dict:
    evals = [r for r in rows if "eval/acc_greedy" in r]
    before, after = evals[0], evals[-1]
    summary = {"run_dir": str(run_dir), "metrics": str(tracker.jsonl_path), "plot": str(tracker.plot_path),
               "adapter": str(adapter_dir), "steps": rows[-1]["step"]}
    for kind in ("greedy", "sampled"):
        b, a = before[f"eval/acc_{kind}"], after[f"eval/acc_{kind}"]
        summary[f"acc_{kind}_before"], summary[f"acc_{kind}_after"] = b, a
        summary[f"gain_{kind}"] = (a - b) / (1 - b) if b < 1 else 0.0
    if tracker.wandb_run is not None:
        summary["wandb"] = str(Path(tracker.wandb_run.dir).parent)
    return summary


def print_summary(summary: dict, out=sys.stdout) -> None:
    print("\n== trillora run finished ==", file=out)
    for kind in ("greedy", "sampled"):
        print(f"held-out accuracy ({kind}): {summary[f'acc_{kind}_before']:.3f} -> {summary[f'acc_{kind}_after']:.3f}"
              f"  (headroom-normalised gain {summary[f'gain_{kind}']:.3f})", file=out)
    for key in ("metrics", "plot", "adapter", "wandb"):
        if key in summary:
            print(f"{key:>8}: {summary[key]}", file=out)
    print(json.dumps(summary), file=out)
