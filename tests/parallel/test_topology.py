"""Layout validation: a bad layout fails before any rank starts, naming the field and sizes."""

from __future__ import annotations

import pytest

from parallel.topology import ModelDims, ParallelConfig, validate_layout
from rlcore.validation import ConfigError

TINY_MOE = ModelDims(num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, vocab_size=128)
TINY_DENSE = ModelDims(num_layers=2, num_heads=4, num_kv_heads=2, num_experts=0, vocab_size=128)


def _error(cfg_kwargs: dict, world: int, dims: ModelDims = TINY_MOE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_layout(ParallelConfig(**cfg_kwargs), world, dims)
    return info.value


def test_valid_layouts_and_derived_sizes():
    for kwargs, world in [({}, 1), ({"tp": 2, "sp": True, "etp": 1}, 2), ({"ep": 2}, 2), ({"pp": 2}, 2),
                          ({"tp": 2, "ep": 2, "sp": True, "etp": 1}, 4), ({"tp": 2, "pp": 2, "sp": True}, 4)]:
        validate_layout(ParallelConfig(**kwargs), world, TINY_MOE)
    cfg = ParallelConfig(tp=2, ep=2, sp=True, etp=1)
    assert (cfg.data_parallel_size(4), cfg.expert_data_parallel_size(4)) == (2, 2)
    assert ParallelConfig(tp=2, sp=True).expert_tp == 2  # megatron's default: etp = tp
    validate_layout(ParallelConfig(tp=2), 2, TINY_DENSE)  # dense models need no SP


def test_ep_must_divide_experts():
    err = _error({"ep": 3}, 3)
    assert err.field == "parallel.ep" and "num_experts=4" in str(err)


def test_tp_must_divide_kv_heads():
    err = _error({"tp": 4, "sp": True}, 4)
    assert err.field == "parallel.tp" and "num_key_value_heads=2" in str(err)


def test_tp_must_divide_vocab_and_pp_layers():
    assert "vocab_size=130" in str(_error({"tp": 4, "sp": True}, 4, ModelDims(2, 4, 4, 4, 130)))
    err = _error({"pp": 4}, 4)
    assert err.field == "parallel.pp" and "num_hidden_layers=2" in str(err)


def test_world_size_must_hold_whole_replicas():
    err = _error({"tp": 2, "sp": True}, 3)
    assert err.field == "world_size" and "tp*cp*pp" in str(err)
    err = _error({"ep": 4, "etp": 1}, 2)
    assert err.field == "world_size" and "etp*ep*pp" in str(err)


def test_moe_with_tp_needs_sequence_parallel():
    err = _error({"tp": 2}, 2)
    assert err.field == "parallel.sp" and "parallel.tp=2" in str(err)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="parallel.tp"):
        ParallelConfig(tp=0)
    with pytest.raises(ConfigError, match="parallel.sp"):
        ParallelConfig(sp=True)  # SP without TP
    with pytest.raises(ConfigError, match="parallel.cp"):
        ParallelConfig(cp=2)  # not implemented by the engine
    with pytest.raises(ConfigError, match="parallel.ep"):
        validate_layout(ParallelConfig(ep=2), 2, TINY_DENSE)


def test_parity_cli_rejects_bad_layout_before_launching(tiny_moe_dir, capsys):
    from parallel.parity import main

    assert main(["--hf-model", str(tiny_moe_dir), "--ep", "3", "--nproc", "3"]) == 2
    assert "parallel.ep" in capsys.readouterr().err
    assert main(["--hf-model", str(tiny_moe_dir), "--tp", "2", "--nproc", "2"]) == 2
    assert "parallel.sp" in capsys.readouterr().err
    assert main(["--hf-model", str(tiny_moe_dir), "--tp", "2", "--sp", "--nproc", "3"]) == 2
    assert "world_size" in capsys.readouterr().err
