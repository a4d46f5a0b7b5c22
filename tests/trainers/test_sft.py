"""The SFT loop of the demo's base stops, writing nothing, when its steps keep going non-finite
(the training fleet skips each such step on every rank; tests/parallel/test_guard.py)."""

from __future__ import annotations

import math
import random

import pytest
from transformers import AutoTokenizer

from rlcore.tasks import arithmetic_problems, carry_slip_answer
from trainers.config import compose_tree, load_run_config
from trainers.grpo import NonFiniteTraining
from trainers.sft import finetune_base, sft_cache_dir, training_answer


class NonFiniteFleet:
    """A training fleet whose every step came out non-finite and was skipped."""

    def __init__(self):
        self.steps = 0
        self.shut_down = False

    def forward_backward(self, batch, objective):
        return {"loss/nll": math.nan}

    def optim_step(self, lr, grad_clip):
        self.steps += 1
        return {"skipped": 1.0, "grad_norm": math.nan, "nonfinite_loss": 1.0}

    def shutdown(self):
        self.shut_down = True


def test_sft_stops_after_max_skipped_steps_and_writes_nothing(tmp_path, tiny_moe_dir):
    cfg = load_run_config(compose_tree([f"model.cache_dir={tmp_path}", "model.sft_steps=50",
                                        "model.sft_batch_size=4", "trainer.max_skipped_steps=3"]))
    fleet = NonFiniteFleet()
    with pytest.raises(NonFiniteTraining, match=r"^step 2: SFT of the base model: 3 optimizer steps in a row"):
        finetune_base(cfg, tiny_moe_dir, AutoTokenizer.from_pretrained(tiny_moe_dir), lambda spec: fleet, log=print)
    assert fleet.steps == 3 and fleet.shut_down
    assert not sft_cache_dir(cfg, tiny_moe_dir).exists()


def test_carry_slip_teaches_the_slip_on_that_share_of_carrying_problems_only():
    rng = random.Random(0)
    problems = arithmetic_problems(4000, seed=0, difficulty=2)
    taught = [(p, training_answer(p, rng, noise=0.0, slip=0.6)) for p in problems]
    carrying = [(p, a) for p, a in taught if carry_slip_answer(p.prompt) is not None]
    assert all(a == p.answer for p, a in taught if carry_slip_answer(p.prompt) is None)
    assert all(a in (p.answer, carry_slip_answer(p.prompt)) for p, a in carrying)
    share = sum(a != p.answer for p, a in carrying) / len(carrying)
    assert 0.2 < len(carrying) / len(problems) < 0.25 and 0.57 < share < 0.63


def test_a_zero_share_draws_nothing_so_older_bases_stay_the_same():
    rng = random.Random(0)
    before = rng.getstate()
    assert all(training_answer(p, rng, noise=0.0, slip=0.0) == p.answer for p in arithmetic_problems(50, seed=0))
    assert rng.getstate() == before
