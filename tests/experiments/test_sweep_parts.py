"""The sweep's parts without fleets: the sweep config group, which fields experiments share,
overrides and clones, the registry (control channel), pruning, the ranking, the control
command, and the Hydra launcher refusing a sweep whose jobs cannot share a base."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlcore.validation import ConfigError
from trainers.config import compose_tree, load_run_config
from trainers.experiments import report
from trainers.experiments.config import HalvingConfig, check_shareable
from trainers.experiments.control import check_clone, clone_diff, job_diffs, merge_overrides
from trainers.experiments.pruning import halving_decisions, judge, rung_steps, Score
from trainers.experiments.registry import Registry
from trainers.run_dir import flatten

REPO = Path(__file__).resolve().parents[2]


def flat(*overrides: str) -> dict:
    return flatten(load_run_config(compose_tree(list(overrides))).to_dict())


def test_the_sweep_group_is_typed_and_validated():
    cfg = load_run_config(compose_tree(["sweep.prune=successive_halving", "sweep.halving.eta=3"]))
    assert (cfg.sweep.prune, cfg.sweep.halving.eta, cfg.sweep.chunk_steps) == ("successive_halving", 3, 5)
    for override, field in (("sweep.prune=random", "sweep.prune"), ("sweep.chunk_steps=0", "sweep.chunk_steps"),
                            ("sweep.halving.eta=1", "sweep.halving.eta"), ("sweep.metric=loss", "sweep.metric")):
        with pytest.raises(ConfigError) as err:
            load_run_config(compose_tree([override]))
        assert err.value.field == field


def test_basic_launcher_stays_selectable_and_trillora_sweep_is_the_default():
    from hydra import compose, initialize_config_dir

    from trainers.config import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        default = compose("train", return_hydra_config=True).hydra.launcher._target_
        basic = compose("train", ["hydra/launcher=basic"], return_hydra_config=True).hydra.launcher._target_
    assert default == "hydra_plugins.trillora_sweep.launcher.TrilloraSweepLauncher"
    assert basic.endswith("BasicLauncher")


def test_what_experiments_may_and_may_not_vary():
    reference = flat()  # the demo: a fine-tuned base (model.sft_steps > 0)
    for own in ("lora.rank=8", "trainer.lr=3e-4", "algorithm=dapo", "rollout.sampling.temperature=0.7",
                "trainer.steps=7", "trainer.keep_checkpoints=5"):
        check_shareable(reference, flat(own), "job 0")
    for other, field in (("parallel.ep=1", "parallel.ep"), ("trainer.train_world_size=4", "trainer.train_world_size"),
                         ("trainer.device=cuda", "trainer.device"), ("rollout.engine.dtype=bfloat16",
                                                                     "rollout.engine.dtype"),
                         ("model.sft_steps=10", "model.sft_steps"), ("trainer.micro_batch_size=8",
                                                                     "trainer.micro_batch_size"),
                         ("sweep.chunk_steps=2", "sweep.chunk_steps"), ("trainer.seed=1", "trainer.seed"),
                         ("task.difficulty=1", "task.difficulty")):
        with pytest.raises(ConfigError) as err:
            check_shareable(reference, flat(other), "job 0")
        assert err.value.field == field
    with pytest.raises(ConfigError, match="set model.sft_seed to vary trainer.seed"):
        check_shareable(reference, flat("trainer.seed=1"), "job 0")
    # with the fine-tuned base's seed fixed, or no fine-tuning, seeds and tasks vary freely
    check_shareable(flat("model.sft_seed=0"), flat("model.sft_seed=0", "trainer.seed=5"), "job 0")
    check_shareable(flat("model.sft_steps=0"), flat("model.sft_steps=0", "trainer.seed=5", "task.difficulty=1"),
                    "job 0")


def test_overrides_diffs_and_clones():
    jobs = [["trainer.steps=4", "lora.rank=8", "trainer.lr=1e-4"],
            ["trainer.steps=4", "lora.rank=32", "trainer.lr=1e-4"]]
    assert job_diffs(jobs) == [{"lora.rank": "8"}, {"lora.rank": "32"}]
    assert merge_overrides(jobs[0], ["trainer.lr=3e-4", "+x.y=1"]) == [
        "trainer.steps=4", "lora.rank=8", "trainer.lr=3e-4", "+x.y=1"]
    assert clone_diff({"lora.rank": "8"}, ["trainer.lr=3e-4"]) == {"lora.rank": "8", "trainer.lr": "3e-4"}
    parent = flat("lora.rank=8")
    check_clone(flat(), parent, flat("lora.rank=8", "trainer.lr=3e-4"), warm_from=10)
    check_clone(flat(), parent, flat("lora.rank=4"), warm_from=None)
    with pytest.raises(ConfigError) as err:
        check_clone(flat(), parent, flat("lora.rank=4"), warm_from=10)
    assert err.value.field == "lora.rank" and "--warm-start" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a warm clone must have steps left to train
        check_clone(flat(), parent, flat("lora.rank=8", "trainer.steps=10"), warm_from=10)
    assert err.value.field == "trainer.steps"
    with pytest.raises(ConfigError) as err:
        check_clone(flat(), parent, flat("lora.rank=8", "parallel.ep=1"), warm_from=None)
    assert err.value.field == "parallel.ep"


def test_the_registry_is_a_control_channel_that_survives_a_restart(tmp_path):
    registry = Registry(tmp_path)
    assert [registry.add(["lora.rank=8"], {"lora.rank": "8"}, job=0), registry.add([], {}, job=1)] == [0, 1]
    request = registry.request("clone", 0, ["trainer.lr=3e-4"], warm_start=True)
    registry.close()
    again = Registry(tmp_path)  # a restarted driver, or the control command
    (pending,) = again.pending()
    assert (pending.id, pending.kind, pending.experiment, pending.overrides, pending.warm_start) == (
        request, "clone", 0, ("trainer.lr=3e-4",), True)
    again.answer(request, True, "experiment 2")
    assert again.pending() == [] and again.get_request(request).state == "done"
    again.set_status(1, "pruned", "rung 0")
    again.decide(1, 0, False)
    assert again.get(1).status == "pruned" and again.decisions() == {(1, 0): False}
    assert again.by_job(0).diff == {"lora.rank": "8"} and again.by_job(5) is None
    assert [e["kind"] for e in again.events()] == ["pruned"]


def rows(step_scores: dict[int, float], start: int = 0) -> list[dict]:
    out = [{"step": start, "eval/acc_sampled": 0.5}]  # the starting evaluation: no training row
    return out + [{"step": s, "eval/acc_sampled": v, "reward/mean": v} for s, v in step_scores.items()]


def test_successive_halving_keeps_the_best_fraction_at_each_rung():
    cfg = HalvingConfig(eta=2, min_chunks=1)
    assert rung_steps(cfg, chunk_steps=2, max_step=9) == [2, 4, 8]
    assert judge([Score(0, 0.5, 0), Score(1, 0.5, 0.1), Score(2, 0.2, 0), Score(3, 0.9, 0)], {0, 1, 2, 3}, 2) == {
        0: False, 1: True, 2: False, 3: True}  # the tie goes to the higher training reward
    history = {0: rows({2: 0.1}), 1: rows({2: 0.4}), 2: rows({2: 0.3}), 3: rows({2: 0.2})}
    decisions = halving_decisions(cfg, 2, "eval/acc_sampled", history, {0, 1, 2, 3}, set())
    assert [(e, rung, kept) for e, rung, kept, _ in decisions] == [(0, 0, False), (1, 0, True), (2, 0, True),
                                                                   (3, 0, False)]
    assert "rank 4 of 4, the best 2 go on" in decisions[0][3]
    # a later arrival (a clone warm-started at step 2 counts from step 4 on) meets the recorded scores
    history[4] = rows({4: 0.8}, start=2)
    history[1] += rows({4: 0.6})[1:]
    history[2] += rows({4: 0.7})[1:]
    decided = {(e, 0) for e in range(4)}
    decisions = halving_decisions(cfg, 2, "eval/acc_sampled", history, {1, 2, 4}, decided)
    assert [(e, rung, kept) for e, rung, kept, _ in decisions] == [(1, 1, False), (2, 1, True), (4, 1, True)]


def test_the_ranking_names_the_best_and_pruned_ones_never_win(tmp_path):
    from trainers.experiments.registry import ExperimentRecord

    def record(i, status):
        return ExperimentRecord(i, i, (), {"trainer.lr": str(i)}, None, False, status, 4, {}, "")

    records = [record(0, "pruned"), record(1, "done"), record(2, "done")]
    history = {0: rows({2: 0.9}), 1: rows({2: 0.3, 4: 0.5}), 2: rows({2: 0.4, 4: 0.7})}
    table = report.ranking(records, history, "eval/acc_sampled")
    assert [e["id"] for e in table] == [2, 1, 0]
    assert report.summary_table(table, "eval/acc_sampled").splitlines()[2].startswith("| best | 2: trainer.lr=2")
    out = report.comparison_plot(records, history, "eval/acc_sampled", tmp_path / "plot.png")
    assert out.stat().st_size > 1000


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_control_command_lists_and_refuses_a_clone_that_cannot_share_the_base(tmp_path):
    registry = Registry(tmp_path)
    registry.set_meta("reference", flat())
    registry.add(["lora.rank=8"], {"lora.rank": "8"}, job=0)
    registry.progress(0, 3, {"reward/mean": 0.25, "eval/acc_sampled": 0.5})
    done = run_script("scripts/experiments.py", "--dir", str(tmp_path), "ls")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:6] == ["0", "active", "3", "0.250", "-", "0.500"]
    refused = run_script("scripts/experiments.py", "--dir", str(tmp_path), "clone", "0", "--set", "parallel.ep=1")
    assert refused.returncode == 2 and "parallel.ep=1: must be the same in every experiment" in refused.stderr
    assert registry.pending() == []
    filed = run_script("scripts/experiments.py", "--dir", str(tmp_path), "stop", "0")
    assert filed.returncode == 0 and [r.kind for r in registry.pending()] == ["stop"]


def test_a_sweep_whose_jobs_cannot_share_a_base_is_refused_before_anything_starts(tmp_path):
    done = run_script("scripts/train.py", "--multirun", f"sweep.dir={tmp_path / 'sweep'}",
                      f"model.cache_dir={tmp_path / 'cache'}", "model.sft_steps=0", "trainer.train_world_size=2",
                      "parallel.ep=1,2")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "invalid configuration: parallel.ep=2: must be the same in every experiment of a sweep" in done.stderr
    assert not (tmp_path / "sweep" / "sweep.db").exists()


@pytest.mark.parametrize("override, field, why", [
    ("trainer.launcher=torchrun", "trainer.launcher", "must be ray in a sweep"),
    ("trainer.max_staleness=1", "trainer.max_staleness", "must be 0 in a sweep"),
    ("trainer.full_parameter=true", "trainer.full_parameter", "must be false in a sweep"),
])
def test_a_sweep_is_refused_under_torchrun_asynchronous_or_full_parameter_before_anything_starts(tmp_path, override, field, why):
    from trainers.experiments.driver import Job, run_sweep

    tree = compose_tree([f"sweep.dir={tmp_path / 'sweep'}", f"model.cache_dir={tmp_path / 'cache'}",
                         "model.sft_steps=0", override])
    with pytest.raises(ConfigError) as err:
        run_sweep([Job(0, (), tree)], compose_tree)
    assert err.value.field == field and why in str(err.value)
    assert not (tmp_path / "sweep").exists()
