"""The launch config group: defaults compose, every bad value names its field, ports per node."""

from __future__ import annotations

import pytest

from rlcore.validation import ConfigError
from trainers.launch.config import LaunchConfig
from trainers.launch.job import compose
from trainers.launch.ray_cluster import ray_start_flags
from trainers.config import load_config
from trainers.main import validate


def test_the_composed_defaults_follow_the_trainer_run_dir():
    job = compose(["trainer.run_dir=/shared/run-7"])
    assert job.launch.run_dir == "/shared/run-7"
    assert job.launch.nodes == 2 and job.launch.gpus_per_node == 0


def test_the_main_job_validates_the_launch_group(tiny_moe_dir):
    model = f"model.hf_path={tiny_moe_dir}"
    assert validate(compose(["launch.nodes=4", model]).tree)[0].launch.nodes == 4
    with pytest.raises(ConfigError, match=r"^launch\.nodes=0"):
        validate(compose(["launch.nodes=0", model]).tree)


@pytest.mark.parametrize("field, value, message", [
    ("nodes", 0, "must be >= 1"),
    ("gpus_per_node", -1, "must be >= 0"),
    ("cpus_per_node", 1.5, "could not be converted to Integer"),
    ("memory_gib_per_node", 0, "must be >= 1"),
    ("job_name", "Trillora_Job", "DNS-1123"),
    ("partition", "a b", "partition name"),
    ("time_limit", "1 hour", "Slurm time"),
    ("sbatch_extra", ["qos=high"], "one sbatch option"),
    ("ray_port", 80, "must be >= 1024"),
    ("worker_port_base", 20005, "overlap the node ports"),
    ("worker_ports_per_node", 5, "must be >= 10"),
    ("dashboard_port", 20003, "outside the per-node ports"),
    ("join_timeout_s", 0, "must be > 0"),
    ("run_dir", "my runs", "without whitespace"),
    ("volume_mount_path", "mnt/x", "absolute path"),
    ("pvc_name", "Runs", "PVC name"),
])
def test_a_bad_value_names_its_field(field, value, message):
    with pytest.raises(ConfigError, match=rf"^launch\.{field}(\[0\])?=.*{message}"):
        load_config(LaunchConfig, {field: value}, "launch")


def test_ports_that_pass_65535_for_many_nodes_are_refused():
    with pytest.raises(ConfigError, match=r"^launch\.worker_ports_per_node=.*pass 65535"):
        LaunchConfig(nodes=400)


def test_each_node_has_its_own_ports_and_only_the_head_has_the_gcs_port():
    cfg = LaunchConfig(nodes=3, ray_port=7000, dashboard_port=7001)
    flags = [ray_start_flags(cfg, i) for i in range(3)]
    ports = [{f.split("=")[1] for f in node if f.split("=")[0].endswith("port")} for node in flags]
    assert not ports[0] & ports[1] and not ports[1] & ports[2] and not ports[0] & ports[2]
    assert "--head" in flags[0] and "--port=7000" in flags[0] and "--dashboard-port=7001" in flags[0]
    assert not any(f.startswith(("--head", "--port=", "--include-dashboard")) for f in flags[1] + flags[2])
    assert "--min-worker-port=21200" in flags[1] and "--max-worker-port=21399" in flags[1]
    assert all(" " not in f for node in flags for f in node), "flags are split by the shell"
