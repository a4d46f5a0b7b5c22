"""scripts/launch.py slurm: the rendered sbatch script (the real cluster runs are in test_slurm_job.py)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.launch import slurm
from trainers.launch.job import REPO


def rendered(*overrides: str) -> str:
    return slurm.render(slurm.prepare(list(overrides)))


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def bash_array(script: str, name: str) -> list[str]:
    """The items of a one-line bash array assignment ``NAME=(...)``, as bash would split them."""
    (line,) = [line for line in script.splitlines() if line.startswith(f"{name}=(")]
    return shlex.split(line[len(name) + 2:-1])


def test_the_script_asks_slurm_for_the_launch_group_sizes():
    script = rendered("launch.nodes=4", "launch.gpus_per_node=8", "launch.cpus_per_node=32",
                      "launch.memory_gib_per_node=500", "launch.partition=gpu", "launch.time_limit=2-00:00:00",
                      "launch.sbatch_extra=['--qos=high','--exclusive']", "trainer.run_dir=/shared/runs/r1")
    assert sbatch_options(script) == [
        "--job-name=trillora", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=32", "--time=2-00:00:00",
        "--output=/shared/runs/r1/launch/slurm-%j.out", "--partition=gpu", "--gpus-per-node=8", "--mem=500G",
        "--qos=high", "--exclusive"]
    assert "--num-gpus=8" in script and script.count("--node-manager-port=") == 4


def test_no_partition_means_the_cluster_default():
    assert not any(o.startswith("--partition") for o in sbatch_options(rendered("launch.partition=null")))


def test_the_driver_gets_the_same_overrides_then_the_cluster_values():
    script = rendered("trainer.steps=3", "logger.run_name='two words'", "launch.run_dir=/shared/r2")
    args = bash_array(script, "DRIVER_ARGS")
    assert args == ["rollout.staging_dir=/shared/r2/staging", "trainer.steps=3", "logger.run_name='two words'",
                    "launch.run_dir=/shared/r2", "trainer.run_dir=/shared/r2"]
    assert '"$PY" scripts/train.py "${DRIVER_ARGS[@]}" "trainer.ray_address=$address"' in script
    assert f"cd {REPO}" in script


def test_one_node_keeps_the_default_staging_and_relative_paths_are_the_checkouts():
    args = bash_array(rendered("launch.nodes=1"), "DRIVER_ARGS")
    assert args == ["launch.nodes=1", f"trainer.run_dir={REPO / 'outputs/run'}"]
    assert f"PY={REPO / '.venv/bin/python'}" in rendered()


def test_the_script_is_valid_bash_and_sets_up_cleanup():
    script = rendered()
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "trap teardown EXIT" in script and "srun --overlap" in script
    assert "ray stop" not in script.replace("`ray stop`", ""), "never a host-wide ray stop"


def test_the_cli_writes_the_script(tmp_path: Path):
    cli = [sys.executable, str(REPO / "scripts/launch.py"), "slurm", "--out", str(tmp_path)]
    done = subprocess.run([*cli, "trainer.steps=2"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'job.sbatch'}"
    assert (tmp_path / "job.sbatch").stat().st_mode & 0o111


@pytest.mark.parametrize("override, message", [("trainer.bogus=1", "invalid override: Could not override"),
                                               ("launch.nodes=two", "launch.nodes=two (Value 'two'")])
def test_a_bad_override_writes_nothing(override, message, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts/launch.py"), "slurm", "--out", str(tmp_path / "out"),
                           override], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_jobs_run_one_agent_per_node_and_size_the_world():
    script = rendered("trainer.launcher=torchrun", "launch.nodes=2", "launch.gpus_per_node=8", "launch.rdzv_port=29600")
    args = bash_array(script, "DRIVER_ARGS")
    assert args[1:3] == ["trainer.train_world_size=16", "rollout.engines=16"] and "trainer.launcher=torchrun" in args
    assert '--nnodes="${#hosts[@]}" --nproc-per-node=8' in script and ":29600" in script
    assert "ray start" not in script and "--gpus-per-node=8" in sbatch_options(script)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_a_torchrun_world_the_allocation_cannot_hold_is_refused():
    from rlcore.validation import ConfigError

    with pytest.raises(ConfigError, match=r"trainer\.train_world_size=4.*launch\.nodes x processes per node = 2"):
        rendered("trainer.launcher=torchrun", "trainer.train_world_size=4")
