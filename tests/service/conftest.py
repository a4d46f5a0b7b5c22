"""Fixtures of the service tests: the tiny base model, one server per module, two keys."""

from __future__ import annotations

import pytest

from tests.service.server_proc import HPCAI_SERVED, SERVED, ServerProcess, build_base


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """(checkpoint dir, HF_HOME) of the served tiny Qwen3-vocabulary MoE."""
    return build_base(tmp_path_factory.mktemp("service-base"))


def _serving(tmp_path_factory, model_dir, served: str, overrides: list[str]):
    proc = ServerProcess(tmp_path_factory.mktemp("service"), model_dir, overrides, served=served)
    proc.start()
    proc.keys = {name: proc.admin("keys", "create", name) for name in ("alice", "bob")}
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model):
    """A server on SQLite with a small body limit (for the oversize checks) and two keys."""
    yield from _serving(tmp_path_factory, base_model[0], SERVED, ["service.limits.max_body_bytes=2000000"])


@pytest.fixture(scope="module")
def hpcai_server(tmp_path_factory, base_model):
    """A server serving the tiny model under the hpcai cookbook's name, two keys; short long
    polls, so an unfinished future is answered within seconds."""
    yield from _serving(tmp_path_factory, base_model[0], HPCAI_SERVED, ["service.ttl.long_poll_s=3"])
