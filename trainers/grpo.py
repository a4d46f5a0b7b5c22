"""One GRPO step, as data (DESIGN.md, "One RL step"):

prompts -> n completions each (vLLM fleet) -> rewards (off the critical path, failures
isolated) -> group advantages -> old log-probs [+ reference log-probs] (Megatron fleet) ->
rollout-correction weights (vLLM vs Megatron log-probs) -> PPO epochs over mini-batches ->
weight sync -> metrics.

An on-policy update (one epoch, one mini-batch of all the step's prompts: no optimizer step
between the old policy and the loss) skips the separate old-log-prob forward
(``trainer.old_logprobs=auto``): the update's own forward gives them, detached
(``rlcore.objective.old_and_weights``), and the step's correction and entropy metrics come from
the log-probs that forward returns.

With ``max_staleness=k > 0`` the samples were generated ahead, during an earlier step's update
(``trainers.rollout_ahead``), up to k policy versions before the policy this step updates;
the sync waits for the generation in flight, and the correction weights cover the lag.

Prompts of step s and the sampling seed of each prompt are functions of (seed, s, index), so a
run resumed at step s draws exactly the samples an uninterrupted run draws.

Safety: an optimizer step whose loss or gradient norm is not finite is skipped by the training
fleet (``parallel.optim``); the step counts them, logs each, and raises ``NonFiniteTraining``
after ``max_skipped_steps`` in a row. Adapter weights are checked finite before every sync, so
the rollout engines never receive a broken policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from rlcore.advantages import grpo_advantages, rloo_advantages
from rlcore.config import AlgorithmConfig
from rlcore.dapo import filter_zero_variance_groups, overlong_reward_shaping
from rlcore.gfpo import gfpo_advantages
from rlcore.gvpo import GVPO_LOSS_MODE, gvpo_group_columns
from rlcore.masked import masked_mean
from rlcore.objective import RLObjective, add_batch_normalisers, correction_weights
from rlcore.rewards import RewardWorkers, get_reward, score_batch
from rlcore.riskpo import riskpo_advantages
from rlcore.tasks import Problem
from rollout.batching import PackedBatch, pack_groups
from rollout.config import SamplingConfig
from rollout.seeding import spread_seed
from trainers.rollout_ahead import RolloutAhead, check_staleness

PHASES = ("generate", "reward", "old_logprobs", "update", "sync")
MISMATCH_METRICS = ("mismatch_kl", "mismatch_k3", "ppl_ratio")  # reported with the correction off too


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str):
        begin = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - begin


def compute_advantages(cfg: AlgorithmConfig, rewards: torch.Tensor, group_ids: torch.Tensor,
                       lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B], rows that train [B] bool) for the configured estimator."""
    estimator, every_row = cfg.advantage_estimator, torch.ones_like(rewards, dtype=torch.bool)
    if estimator in ("grpo", "drgrpo"):
        return grpo_advantages(rewards, group_ids, norm_by_std=cfg.divides_by_std, eps=cfg.advantage_eps), every_row
    if estimator == "rloo":
        return rloo_advantages(rewards, group_ids), every_row
    if estimator == "gfpo":
        return gfpo_advantages(rewards, group_ids, lengths, keep=cfg.gfpo_keep, metric=cfg.gfpo_metric,
                               norm_by_std=cfg.divides_by_std, std_over_kept=cfg.gfpo_std_over_kept,
                               eps=cfg.advantage_eps)
    if estimator == "riskpo":
        return riskpo_advantages(rewards, group_ids, bundle_size=cfg.riskpo_bundle_size, alpha=cfg.riskpo_alpha,
                                 beta=cfg.riskpo_beta, mix=cfg.riskpo_mix, norm_by_std=cfg.divides_by_std,
                                 credit=cfg.riskpo_credit, eps=cfg.advantage_eps), every_row
    raise ValueError(f"advantage_estimator={estimator!r} has no implementation in the step")


def uses_gvpo_reference(cfg: AlgorithmConfig) -> bool:
    """GVPO anchored at the reference policy needs its log-probs every step."""
    return cfg.loss_mode == GVPO_LOSS_MODE and cfg.gvpo_anchor == "ref"


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


@dataclass
class StepSettings:
    """What a step needs besides the fleets (all from RunConfig)."""

    algorithm: AlgorithmConfig
    sampling: SamplingConfig
    samples_per_prompt: int
    ppo_epochs: int
    mini_batch_prompts: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    seed: int
    reward_timeout_s: float
    reward_workers: int
    max_skipped_steps: int = 3
    fault_steps: tuple[int, ...] = ()  # trainer.fault_steps / fault_kind (fault injection)
    fault_kind: str = "nan"
    adapter: str = "default"  # the training fleet's adapter this step trains (many share a base)
    old_logprobs: str = "auto"  # trainer.old_logprobs: auto skips their forward when provably on-policy
    keep_reward_workers: bool = True  # False: fresh reward workers every step (the benchmark's "before")
    max_staleness: int = 0  # trainer.max_staleness: > 0 generates that many steps ahead (trainers.rollout_ahead)

    @classmethod
    def from_run(cls, cfg, adapter: str = "default") -> StepSettings:
        """The settings of a run's configuration (``trainers.config.RunConfig``) for ``adapter``."""
        t = cfg.trainer
        return cls(cfg.algorithm, cfg.rollout.sampling, t.samples_per_prompt, t.ppo_epochs, t.mini_batch_prompts,
                   t.lr, t.betas, t.weight_decay, t.grad_clip, t.seed, t.reward_timeout_s, t.reward_workers,
                   t.max_skipped_steps, t.fault_steps, t.fault_kind, adapter, t.old_logprobs,
                   max_staleness=t.max_staleness)

    def on_policy(self, prompts: int) -> bool:
        """Whether a step of ``prompts`` prompts takes its old log-probs from the update's forward:
        one epoch of one mini-batch, so no optimizer step comes between them and the loss."""
        return self.old_logprobs == "auto" and self.ppo_epochs == 1 and self.mini_batch_prompts >= prompts


class NonFiniteTraining(RuntimeError):
    """Training produced something non-finite that skipping steps did not cure."""

    def __init__(self, step: int, what: str):
        self.step = step
        super().__init__(f"step {step}: {what}")


@dataclass(frozen=True)
class PoisonedObjective:
    """Fault injection: the objective's loss times nan or inf, so every gradient the training
    ranks compute through megatron's backward is non-finite (a real fault, not a mock)."""

    inner: object
    scale: float

    def __call__(self, logprobs, micro_batch):
        loss, metrics = self.inner(logprobs, micro_batch)
        return loss * self.scale, metrics


class GRPOStep:
    """Runs steps against a rollout fleet, a training fleet and a weight sync."""

    def __init__(self, settings: StepSettings, rollout, training, sync, tokenizer,
                 recover=lambda call: call(), log=print, problems_for: Callable[[int], list[Problem]] | None = None):
        """``recover(call)`` runs a rollout-fleet call, restarting dead engines and retrying.
        ``problems_for(step)``, a step's problems, lets ``max_staleness > 0`` generate ahead."""
        self.s = settings
        self.recover = recover
        self.rollout, self.training, self.sync, self.tokenizer = rollout, training, sync, tokenizer
        self.reward_fn = get_reward(settings.algorithm.reward)
        self.objective = RLObjective(settings.algorithm)
        # The policy's log-probs are those of the distribution vLLM samples from.
        self.temperature = settings.sampling.temperature or 1.0
        self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewards")
        self._reward_workers = RewardWorkers(self.reward_fn)  # kept across steps: no interpreter starts per step
        self.skipped_total = 0  # optimizer steps skipped over the run (resumed with the run)
        self._skipped_in_a_row = 0
        self.log = log
        self.ahead = None
        if settings.max_staleness:
            if problems_for is None:
                raise ValueError("max_staleness > 0 generates ahead: GRPOStep needs problems_for")
            draw = lambda step: self.rollout.generate(*self._requests(problems_for(step), step))  # noqa: E731
            self.ahead = RolloutAhead(draw, lambda step: self.recover(lambda: draw(step)), settings.max_staleness)

    def _requests(self, problems: list[Problem], step: int):
        """``rollout.generate``'s arguments for a step's problems: each prompt's seed is a
        function of (seed, step, index), whenever and wherever it is drawn."""
        prompts = [self.tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
        seeds = [spread_seed(self.s.seed, step, i) for i in range(len(problems))]
        return prompts, self.s.samples_per_prompt, self.s.sampling, seeds

    def generate(self, problems: list[Problem], step: int, timer: PhaseTimer, metrics: dict[str, float]):
        """The step's samples: drawn now, or (``max_staleness > 0``) taken from generation ahead,
        every sample's staleness checked against the bound."""
        with timer("generate"):
            if self.ahead is None:
                return self.recover(lambda: self.rollout.generate(*self._requests(problems, step)))
            groups = self.ahead.take(step)
        staleness = check_staleness(groups, self.rollout.version, self.s.max_staleness)
        metrics.update({"async/staleness_mean": sum(staleness) / len(staleness),
                        "async/staleness_max": float(max(staleness))})
        return groups

    def run(self, problems: list[Problem], step: int, before_update=lambda: None) -> dict[str, float]:
        """One step; ``before_update()`` may raise to abandon it while its weights are untouched."""
        timer, begin, metrics = PhaseTimer(), time.perf_counter(), {}
        groups = self.generate(problems, step, timer, metrics)
        packed = pack_groups(groups, pad_token_id=self.tokenizer.pad_token_id)
        texts = [c.text for g in groups for c in g.completions]
        answers = [p.answer for p, g in zip(problems, groups) for _ in g.completions]
        # Rewards run in worker processes (kept from step to step) while the training fleet
        # computes old log-probs, if the step needs them.
        rewards_future = self._reward_pool.submit(
            score_batch, self.reward_fn, texts, answers, timeout_s=self.s.reward_timeout_s,
            max_workers=self.s.reward_workers, pool=self._reward_workers if self.s.keep_reward_workers else None)
        batch = packed.training_inputs()
        with timer("old_logprobs"):
            old_logprobs = entropy = ref_logprobs = None
            if not self.s.on_policy(len(problems)):
                old_logprobs, entropy = self.training.compute_logprobs(batch, self.temperature, with_entropy=True,
                                                                       adapter=self.s.adapter)
            if self.s.algorithm.tracks_reference_kl or uses_gvpo_reference(self.s.algorithm):
                ref_logprobs = self.training.compute_logprobs(batch, self.temperature, adapter=None)
        with timer("reward"):
            reward_list, reward_metrics = rewards_future.result()
        metrics.update({f"reward/{k}": v for k, v in reward_metrics.items()})
        train_batch, more = self.prepare(packed, torch.tensor(reward_list), old_logprobs, ref_logprobs, entropy)
        metrics.update(more)
        before_update()
        with timer("update"):
            metrics.update(self.update(train_batch, packed.group_ids[train_batch.pop("row_index")], step))
        if self.ahead is not None:
            with timer("generate"):  # no engine changes weights under a request
                self.ahead.drain()
        with timer("sync"):
            try:  # the sync checks the weights on every rank before any engine waits for them
                report = self.recover(lambda: self.sync.push(self.training, adapter=self.s.adapter))
            except FloatingPointError as err:
                raise NonFiniteTraining(step, f"{err} (after the update)") from None
        if self.ahead is not None:
            self.ahead.complete(step)
        metrics.update({"sync/bytes": report.bytes, "sync/seconds": report.seconds, "sync/version": report.version,
                        "sync/largest_buffer": report.largest_buffer})
        step_seconds = time.perf_counter() - begin
        tokens = int(packed.attention_mask.sum())
        metrics.update({f"time/{phase}": timer.seconds.get(phase, 0.0) for phase in PHASES})
        metrics.update({"time/step": step_seconds, "perf/tokens_per_s": tokens / step_seconds,
                        "perf/orchestration_overhead": step_seconds / max(1e-9, sum(
                            timer.seconds.get(p, 0.0) for p in ("generate", "old_logprobs", "update", "sync")))})
        return metrics

    def prepare(self, packed: PackedBatch, rewards: torch.Tensor, old_logprobs, ref_logprobs, entropy):
        """Rewards -> advantages -> correction weights; the rows that train, and metrics. Without
        ``old_logprobs`` (on-policy) the rows carry ``rollout_logprobs`` for the objective instead."""
        cfg = self.s.algorithm
        mask = packed.response_mask.float()
        lengths = mask.sum(-1)
        metrics = {"reward/mean": rewards.mean().item(),
                   "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
                   "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item()}
        if cfg.overlong_shaping:
            rewards = rewards + overlong_reward_shaping(lengths, cfg.overlong_max_len, cfg.overlong_cache_len,
                                                        cfg.overlong_penalty)
        advantages, keep = compute_advantages(cfg, rewards, packed.group_ids, lengths)
        if cfg.dynamic_sampling:
            keep &= filter_zero_variance_groups(rewards, packed.group_ids)
        metrics["reward/kept_frac"] = keep.float().mean().item()
        batch = {**packed.training_inputs(), "advantages": advantages, "row_index": torch.arange(len(rewards))}
        if old_logprobs is None:
            batch["rollout_logprobs"] = packed.rollout_logprobs
        else:
            batch["old_logprobs"] = old_logprobs
            batch["is_weights"], more = self.old_policy_metrics(old_logprobs, packed.rollout_logprobs, mask,
                                                                entropy, ref_logprobs)
            metrics.update(more)
        if ref_logprobs is not None:
            batch["ref_logprobs"] = ref_logprobs
        rows = keep.nonzero().squeeze(-1)
        batch = select_rows(batch, rows)
        if cfg.loss_mode == GVPO_LOSS_MODE:
            batch.update(gvpo_group_columns(packed.group_ids[rows]))
        return batch, metrics

    def old_policy_metrics(self, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                           entropy: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None):
        """Correction weights (ones when off) and the old policy's metrics: mismatch to the rollout
        engine, entropy (without the full distribution: mean -log p of the sampled tokens, an
        unbiased estimate of it for on-policy samples), KL to the reference."""
        cfg, metrics = self.s.algorithm, {}
        weights, correction = correction_weights(cfg, old_logprobs, rollout_logprobs, mask)
        if cfg.correction_enabled:
            metrics.update({f"correction/{k}": v for k, v in correction.items()})
        else:  # the mismatch is measured every step; weights that are not applied are not reported
            weights = torch.ones_like(mask)
            metrics.update({f"correction/{k}": correction[k] for k in MISMATCH_METRICS})
        if entropy is None:
            metrics["policy/entropy_estimate"] = masked_mean(-old_logprobs, mask).item()
        else:
            metrics["policy/entropy"] = masked_mean(entropy, mask).item()
        if ref_logprobs is not None:
            metrics["policy/kl_ref"] = masked_mean(old_logprobs - ref_logprobs, mask).item()
        return weights, metrics

    def update(self, batch: dict[str, torch.Tensor], group_ids: torch.Tensor, step: int) -> dict[str, float]:
        """PPO epochs; each optimizer step takes ``mini_batch_prompts`` whole groups. On-policy
        (no ``old_logprobs``): the old policy's metrics from the log-probs the update saw."""
        if batch["input_ids"].shape[0] == 0:
            return {"update/skipped": 1.0}
        objective = self.objective
        if step in self.s.fault_steps:
            if self.s.fault_kind == "skip_update":
                self.log(f"step {step}: fault injection: update skipped")
                return {"update/skipped": 1.0, "optim/skipped_steps": float(self.skipped_total)}
            objective = PoisonedObjective(self.objective, float(self.s.fault_kind))
        groups = torch.unique(group_ids)
        generator = torch.Generator().manual_seed(spread_seed(self.s.seed, step))
        totals: dict[str, float] = {}
        count, on_policy, old = 0, "old_logprobs" not in batch, {}
        for _ in range(self.s.ppo_epochs):
            order = groups[torch.randperm(len(groups), generator=generator)]
            for chosen in order.split(self.s.mini_batch_prompts):
                rows = torch.isin(group_ids, chosen).nonzero().squeeze(-1)
                mini = add_batch_normalisers(select_rows(batch, rows))
                metrics = self.training.forward_backward(mini, objective, self.temperature, adapter=self.s.adapter,
                                                         return_logprobs=on_policy)
                if on_policy:
                    metrics, seen = metrics
                    _, old = self.old_policy_metrics(seen, mini["rollout_logprobs"], mini["loss_mask"].float(),
                                                     ref_logprobs=mini.get("ref_logprobs"))
                optim = self.training.optim_step(self.s.lr, self.s.betas, self.s.weight_decay, self.s.grad_clip,
                                                 adapter=self.s.adapter)
                self._count_skip(step, count, metrics.get("loss", 0.0), optim)
                metrics.update({f"optim/{k}": v for k, v in optim.items()})
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                count += 1
        out = {**old, **{k: v / count for k, v in totals.items()}}
        out["loss/policy"] = out.pop("loss/policy", 0.0)
        out["optim/lr"] = self.s.lr
        out["optim/skipped"] = out.pop("optim/skipped", 0.0) * count  # this step's skipped optimizer steps
        out["optim/skipped_steps"] = float(self.skipped_total)
        return out

    def _count_skip(self, step: int, index: int, loss: float, optim: dict[str, float]) -> None:
        """Logs a skipped optimizer step; too many in a row end the run (NonFiniteTraining)."""
        if not optim["skipped"]:
            self._skipped_in_a_row = 0
            return
        self.skipped_total += 1
        self._skipped_in_a_row += 1
        what = f"loss={loss}" if optim["nonfinite_loss"] else f"gradient norm={optim['grad_norm']}"
        self.log(f"step {step}: optimizer step {index + 1} skipped: non-finite {what} "
                 f"({self._skipped_in_a_row} in a row, {self.skipped_total} in the run)")
        if self._skipped_in_a_row >= self.s.max_skipped_steps:
            raise NonFiniteTraining(step, f"{self._skipped_in_a_row} optimizer steps in a row were skipped, "
                                          f"the last with a non-finite {what}")

    def state_dict(self) -> dict:
        """Counters, and with generation ahead the samples of the next steps (at a step boundary)."""
        state = {"skipped_total": self.skipped_total, "skipped_in_a_row": self._skipped_in_a_row}
        if self.ahead is not None:
            state["ahead"] = self.ahead.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total, self._skipped_in_a_row = state["skipped_total"], state["skipped_in_a_row"]
        if self.ahead is not None and "ahead" in state:
            self.ahead.load_state_dict(state["ahead"])

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        self._reward_pool.shutdown(wait=True, cancel_futures=True)  # the scoring thread is done with the workers
        self._reward_workers.close()
