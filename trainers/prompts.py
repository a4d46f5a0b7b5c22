"""Training prompts per step and the held-out set, as pure functions of the seed and the step.

The arithmetic task draws each step's prompts from (seed, step). A JSONL file is read in
epochs: epoch e visits every row exactly once, in the order of a permutation seeded by
(seed, e), and step s takes positions (s - 1) * n ... s * n - 1 of that endless sequence, so a
resumed run continues the order an uninterrupted run follows.
"""

from __future__ import annotations

import random

from rlcore.tasks import Problem, arithmetic_problems, load_prompt_jsonl
from rollout.seeding import spread_seed
from trainers.config import RunConfig


class PromptSource:
    def __init__(self, cfg: RunConfig, log=print):
        self.cfg = cfg
        self.rows: list[Problem] | None = None
        self._orders: dict[int, list[int]] = {}  # epoch -> its permutation of the rows
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

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            random.Random(spread_seed(self.cfg.trainer.seed, epoch)).shuffle(order)
            self._orders = {epoch: order}  # steps move forward: one epoch is enough to keep
        return self._orders[epoch]

    def for_step(self, step: int) -> list[Problem]:
        n, seed = self.cfg.trainer.prompts_per_step, self.cfg.trainer.seed
        if self.rows is None:
            return arithmetic_problems(n, seed=spread_seed(seed, step), split="train", difficulty=self.cfg.task.difficulty)
        picked = []
        for position in range((step - 1) * n, step * n):
            epoch, index = divmod(position, len(self.rows))
            picked.append(self.rows[self._epoch_order(epoch)[index]])
        return picked
