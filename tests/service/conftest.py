"""Fixtures of the service tests: the tiny base model, one server per module, two keys."""

from __future__ import annotations

import pytest

from tests.service.server_proc import ServerProcess, build_base


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """(checkpoint dir, HF_HOME) of the served tiny Qwen3-vocabulary MoE."""
    return build_base(tmp_path_factory.mktemp("service-base"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model):
    """A server on SQLite with a small body limit (for the oversize checks) and two keys."""
    proc = ServerProcess(tmp_path_factory.mktemp("service"), base_model[0],
                         ["service.limits.max_body_bytes=2000000"])
    proc.start()
    proc.keys = {name: proc.admin("keys", "create", name) for name in ("alice", "bob")}
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]
