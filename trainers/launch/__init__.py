"""Launchers: the same Hydra-configured main job on a Slurm allocation or a KubeRay cluster.

``scripts/launch.py slurm|kuberay [overrides] --out DIR`` renders the job from templates
under ``configs/launch/`` sized by the ``launch`` config group (``config.LaunchConfig``).
"""
