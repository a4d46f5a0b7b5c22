"""Launchers: the same Hydra-configured main job on a Slurm allocation, a KubeRay cluster, or
as a torchrun job without Ray.

``scripts/launch.py slurm|kuberay [overrides] --out DIR`` renders the job from templates
under ``configs/launch/`` sized by the ``launch`` config group (``config.LaunchConfig``);
``torchrun ... scripts/train.py trainer.launcher=torchrun`` runs it SPMD (``torchrun/``).
"""
