"""Supervised fine-tuning of the demo's base model through the training fleet, then cached.

The demo starts from a random tiny MoE; GRPO needs a policy that is partially competent on
the task so that rewards vary within groups. This module fine-tunes all weights (no LoRA)
with token-mean cross entropy on the answers of task problems, through the same Megatron
training fleet the RL run uses, and writes the result as an HF checkpoint. The cache key is
everything that determines the result, so a later run with the same settings reuses it.

``sft_label_noise`` replaces that share of training answers with a near miss (off by 1 or
10): the model then puts real probability on wrong answers next to the right one, the
"pass@k > pass@1" regime in which RL with a verifier has headroom, as with real LLMs.
``sft_carry_slip`` teaches a systematic misconception instead: that share of the sums
whose units column carries drops the carry. Above one half the base is confidently wrong
on those problems (greedy decoding too) yet samples the right answer often enough for a
verifier to reward it: headroom for greedy and sampled accuracy alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from rlcore.objective import NLLObjective, add_batch_normalisers
from rlcore.tasks import Problem, arithmetic_problems, carry_slip_answer
from rollout.seeding import spread_seed
from trainers.config import RunConfig
from trainers.grpo import NonFiniteTraining
from trainers.training_fleet import TrainingFleet, TrainingFleetSpec

SFT_SEED_TAG = 5_000_000_003
WARMUP_SHARE = 0.1


def sft_seed(cfg: RunConfig) -> int:
    return cfg.trainer.seed if cfg.model.sft_seed is None else cfg.model.sft_seed


def sft_cache_dir(cfg: RunConfig, base_dir: Path) -> Path:
    """The slip enters the key only when set, so bases cached before it existed are still found."""
    slip = {"slip": cfg.model.sft_carry_slip} if cfg.model.sft_carry_slip else {}
    key = json.dumps({**slip, "base": str(base_dir.resolve()), "tiny": asdict(cfg.model.tiny) if cfg.model.tiny else None, "steps": cfg.model.sft_steps,
                      "lr": cfg.model.sft_lr, "batch": cfg.model.sft_batch_size,
                      "noise": cfg.model.sft_label_noise, "task": asdict(cfg.task),
                      "seed": sft_seed(cfg)}, sort_keys=True)
    return Path(cfg.model.cache_dir) / f"sft-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to zero."""
    warmup = max(1, int(total * WARMUP_SHARE))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def training_answer(problem: Problem, rng: random.Random, noise: float, slip: float) -> str:
    """The answer SFT teaches: the carry slip (share ``slip`` of the problems that have one),
    else a near miss (share ``noise``), else the right one. No draw is made for a zero share,
    so a base made without one is the same as before it existed."""
    slipped = carry_slip_answer(problem.prompt) if slip > 0 else None
    if slipped is not None and rng.random() < slip:
        return slipped
    if noise <= 0 or rng.random() >= noise:
        return problem.answer
    return str(int(problem.answer) + rng.choice((-10, -1, 1, 10)))


def sft_batch(problems: list[Problem], tokenizer, rng: random.Random, noise: float,
              slip: float) -> dict[str, torch.Tensor]:
    """prompt + answer + EOS per row, right-padded; the loss covers answer and EOS."""
    rows = []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(training_answer(p, rng, noise, slip), add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer + [tokenizer.eos_token_id]))
    return packed_batch(rows, tokenizer.pad_token_id)


def packed_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, target ids) rows, right-padded; the loss covers the targets."""
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, target) in enumerate(rows):
        n, m = len(prompt), len(prompt) + len(target)
        input_ids[i, :m] = torch.tensor(prompt + target)
        attention[i, :m] = 1
        loss_mask[i, n:m] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def finetune_base(cfg: RunConfig, base_dir: Path, tokenizer, make_fleet: Callable[[TrainingFleetSpec], TrainingFleet],
                  log=print) -> Path:
    """Returns the cached SFT checkpoint for ``cfg``, making it first if needed (on a training
    fleet from ``make_fleet``: Ray actors or the torchrun ranks, ``trainers.fleet_hosts``)."""
    out = sft_cache_dir(cfg, base_dir)
    if (out / "model.safetensors").is_file():
        log(f"SFT base model: cached at {out}")
        return out
    steps, batch_size, seed = cfg.model.sft_steps, cfg.model.sft_batch_size, sft_seed(cfg)
    spec = TrainingFleetSpec(str(base_dir), cfg.parallel, None, cfg.trainer.train_world_size,
                             micro_batch_size=batch_size, seed=seed, train_base=True,
                             backend=cfg.backend)
    fleet = make_fleet(spec)
    rng = random.Random(spread_seed(seed, SFT_SEED_TAG))

    def batch_at(step: int) -> dict[str, torch.Tensor]:
        problems = arithmetic_problems(batch_size, seed=spread_seed(seed, SFT_SEED_TAG, step),
                                       split="train", difficulty=cfg.task.difficulty)
        return sft_batch(problems, tokenizer, rng, cfg.model.sft_label_noise, cfg.model.sft_carry_slip)

    supervised_steps(fleet, batch_at, steps, cfg.model.sft_lr, cfg.trainer.max_skipped_steps)
    state = fleet.export_hf_state_dict()
    fleet.shutdown()
    write_hf_checkpoint(state, base_dir, out)
    log(f"SFT base model: written to {out}")
    return out


def supervised_steps(fleet: TrainingFleet, batch_at: Callable[[int], dict[str, torch.Tensor]], steps: int,
                     peak_lr: float, max_skipped: int, desc: str = "SFT of the base model") -> None:
    """``steps`` steps of token-mean cross entropy on ``batch_at(step)`` (``lr_at``'s schedule,
    gradients clipped at 1); shuts the fleet down and raises after ``max_skipped`` optimizer
    steps in a row were skipped as non-finite (the fleet kept the weights as they were)."""
    from tqdm import tqdm

    skipped_in_a_row = 0
    with tqdm(range(steps), desc=desc, unit="step", mininterval=5) as bar:
        for step in bar:
            metrics = fleet.forward_backward(add_batch_normalisers(batch_at(step)), NLLObjective())
            optim = fleet.optim_step(lr_at(step, steps, peak_lr), grad_clip=1.0)
            skipped_in_a_row = skipped_in_a_row + 1 if optim["skipped"] else 0
            if skipped_in_a_row >= max_skipped:
                fleet.shutdown()
                raise NonFiniteTraining(step, f"{desc}: {skipped_in_a_row} optimizer steps in a row were skipped "
                                              f"(non-finite loss {metrics['loss/nll']} or gradient norm "
                                              f"{optim['grad_norm']}); nothing was written")
            bar.set_postfix(nll=f"{metrics['loss/nll']:.3f}", refresh=False)


def write_hf_checkpoint(state: dict[str, torch.Tensor], base_dir: Path, out: Path) -> None:
    """``state`` as an HF checkpoint at ``out``, with ``base_dir``'s config and tokenizer (atomic rename)."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
