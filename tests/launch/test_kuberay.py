"""scripts/launch.py kuberay: RayJob and RayCluster manifests, validated strictly against the
CRDs of KubeRay v1.7.0 (tests/launch/crds). No Kubernetes cluster runs here."""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys

import pytest
import yaml

from rlcore.validation import ConfigError
from tests.launch.crd_schema import errors
from trainers.launch import kuberay
from trainers.launch.job import REPO


def manifests(*overrides: str) -> dict[str, dict]:
    return kuberay.manifests(kuberay.prepare(list(overrides)))


SIZES = [(), ("launch.nodes=1",), ("launch.nodes=8", "launch.gpus_per_node=8", "launch.cpus_per_node=96",
                                   "launch.memory_gib_per_node=1800", "launch.image=registry.example/trillora:1.0")]


@pytest.mark.parametrize("overrides", SIZES)
def test_the_manifests_pass_the_crd_schemas(overrides):
    for manifest in manifests(*overrides).values():
        assert errors(manifest) == []


def test_the_cli_writes_both_files_as_plain_yaml(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts/launch.py"), "kuberay", "--out", str(tmp_path),
                           "trainer.steps=5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    job, cluster = (yaml.safe_load((tmp_path / name).read_text()) for name in ("rayjob.yaml", "raycluster.yaml"))
    assert (job["apiVersion"], job["kind"], cluster["apiVersion"], cluster["kind"]) == (
        "ray.io/v1", "RayJob", "ray.io/v1", "RayCluster")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert "*id" not in (tmp_path / "rayjob.yaml").read_text(), "no YAML aliases"


def test_the_cluster_is_sized_by_the_launch_group():
    spec = manifests("launch.nodes=4", "launch.gpus_per_node=8", "launch.cpus_per_node=64", "launch.image=img:2",
                     "launch.pvc_name=runs", "launch.volume_mount_path=/data")["raycluster.yaml"]["spec"]
    (workers,) = spec["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 3
    for group in (spec["headGroupSpec"], workers):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "img:2"
        assert container["resources"]["limits"] == {"cpu": "64", "nvidia.com/gpu": "8"}
        assert container["volumeMounts"] == [{"name": "runs", "mountPath": "/data"}]
        assert pod["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}]


def test_no_gpus_means_no_gpu_limit_and_one_node_no_workers():
    spec = manifests("launch.nodes=1")["raycluster.yaml"]["spec"]
    assert spec["workerGroupSpecs"][0]["replicas"] == 0
    assert "nvidia.com/gpu" not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_the_entrypoint_is_the_main_job_with_the_users_overrides_on_the_shared_volume():
    entrypoint = manifests("trainer.steps=5", "algorithm=dapo")["rayjob.yaml"]["spec"]["entrypoint"]
    words = shlex.split(entrypoint)
    assert words[:6] == ["cd", "/workspace/trillora", "&&", "python", "scripts/train.py",
                         "model.cache_dir=/mnt/trillora/cache"]
    assert words[6:] == ["rollout.staging_dir=/mnt/trillora/outputs/run/staging", "trainer.steps=5", "algorithm=dapo",
                         "trainer.run_dir=/mnt/trillora/outputs/run", "trainer.ray_address=auto"]


@pytest.mark.parametrize("override, field", [
    ("trainer.run_dir=/tmp/run", "launch.run_dir"),
    ("model.cache_dir=outputs/cache", "model.cache_dir"),
    ("rollout.staging_dir=/dev/shm/x", "rollout.staging_dir"),
])
def test_what_every_pod_reads_must_be_on_the_shared_volume(override, field):
    with pytest.raises(ConfigError, match=rf"^{field}=.*launch.volume_mount_path=/mnt/trillora"):
        manifests(override)


def test_one_pod_may_stage_in_its_own_memory():
    assert manifests("launch.nodes=1", "rollout.staging_dir=/dev/shm/x")


def mutate(manifest: dict, path: str, value: object) -> dict:
    """A copy with ``value`` at dotted ``path`` (numbers index lists); a new key is added."""
    manifest = copy.deepcopy(manifest)
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return manifest


@pytest.mark.parametrize("name, path, value, expected", [
    ("rayjob.yaml", "spec.entrypiont", "python x.py", "Additional properties are not allowed ('entrypiont'"),
    ("rayjob.yaml", "spec.shutdownAfterJobFinishes", "yes", "'yes' is not of type 'boolean'"),
    ("raycluster.yaml", "spec.workerGroupSpecs.0.replicas", "3", "'3' is not of type 'integer'"),
    ("raycluster.yaml", "spec.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always",
     "('imagePullPolicyy' was unexpected)"),
    ("raycluster.yaml", "spec.headGroupSpec.template.spec.volumes.0.persistentVolumeClaim.claimName", 7,
     "7 is not of type 'string'"),
])
def test_a_wrong_field_fails_the_schema(name, path, value, expected):
    found = errors(mutate(manifests()[name], path, value))
    assert any(expected in e for e in found), found


def test_a_missing_required_field_fails_the_schema():
    manifest = copy.deepcopy(manifests()["raycluster.yaml"])
    del manifest["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in errors(manifest))
