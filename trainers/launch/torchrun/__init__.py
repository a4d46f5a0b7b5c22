"""The torchrun (SPMD) mode of the main job: no Ray, every rank a training shard and an engine.

``channel``: rank 0 drives, every rank executes; ``fleets``: the training fleet, rollout fleet
and weight sync over the ranks; ``run``: the entry point ``trainers.main.run`` takes for
``trainer.launcher=torchrun``.
"""
