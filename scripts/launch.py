"""Renders (and for Slurm, submits) the main job for a cluster.

    python scripts/launch.py slurm [Hydra overrides] --out DIR [--submit]
    python scripts/launch.py kuberay [Hydra overrides] --out DIR

``slurm`` writes DIR/job.sbatch (``--submit`` also submits it and prints the job id);
``kuberay`` writes DIR/rayjob.yaml and DIR/raycluster.yaml. Cluster sizes, ports and paths
are the ``launch`` group (configs/launch/default.yaml): ``launch.nodes=4 launch.gpus_per_node=8``.
The driver gets the same overrides. A bad value fails naming the field, before any submission.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra.errors import HydraException  # noqa: E402

from rlcore.validation import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("slurm", "kuberay"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the main job (key=value)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the rendered files")
    parser.add_argument("--submit", action="store_true", help="slurm: submit the script with sbatch")
    args = parser.parse_intermixed_args(argv)
    if args.submit and args.target != "slurm":
        parser.error("--submit is for slurm (apply the KubeRay manifests with kubectl)")
    try:
        if args.target == "slurm":
            from trainers.launch import slurm

            job = slurm.prepare(args.overrides)
            script = slurm.write(job, args.out)
            print(f"wrote {script}")
            if args.submit:
                print(f"submitted batch job {slurm.submit(job, script)}")
        else:
            from trainers.launch import kuberay

            for path in kuberay.write(kuberay.prepare(args.overrides), args.out):
                print(f"wrote {path}")
    except ConfigError as err:
        print(f"invalid configuration: {err}", file=sys.stderr)
        return 2
    except HydraException as err:
        cause = f" ({str(err.__cause__).splitlines()[0]})" if err.__cause__ else ""
        print(f"invalid override: {err}{cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
