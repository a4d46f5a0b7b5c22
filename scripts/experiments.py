"""Steers a running sweep (``scripts/train.py --multirun ...``) through its registry.

    python scripts/experiments.py ls                                  # experiments, status, latest metrics
    python scripts/experiments.py stop 2                              # stop after its chunk
    python scripts/experiments.py resume 2                            # a stopped or pruned one goes on
    python scripts/experiments.py clone 1 --set trainer.lr=3e-4 --warm-start   # fork from its adapter

``--dir`` is the sweep's directory (``sweep.dir``, default outputs/sweep). Requests are rows in
``<dir>/sweep.db``; the driver applies them between chunks, and one filed while no driver
runs is applied when the sweep's command runs again. ``--wait`` waits for the answer (exit 1
if refused). A clone is checked here first, as the driver will check it: a field that would
keep it off the sweep's base is named and nothing is filed (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlcore.validation import ConfigError  # noqa: E402
from trainers.experiments.registry import Registry  # noqa: E402

COLUMNS = ("id", "status", "step", "reward", "acc_greedy", "acc_sampled", "config", "note")


def listing(registry: Registry) -> list[dict]:
    rows = []
    for r in registry.experiments():
        m = r.metrics
        origin = f" (clone of {r.parent}{', warm' if r.warm_start else ''})" if r.parent is not None else ""
        rows.append({"id": r.id, "status": r.status, "step": r.step, "reward": m.get("reward/mean"),
                     "acc_greedy": m.get("eval/acc_greedy"), "acc_sampled": m.get("eval/acc_sampled"),
                     "config": " ".join(f"{k}={v}" for k, v in r.diff.items()) + origin, "note": r.note})
    return rows


def print_table(rows: list[dict]) -> None:
    cells = [[("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)) for v in
              (row[c] for c in COLUMNS)] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(COLUMNS)]
    for line in [list(COLUMNS)] + cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())


def check_clone_here(registry: Registry, parent_id: int, changes: list[str], warm_start: bool) -> None:
    """The driver's checks of a clone, before anything is filed (``ConfigError``)."""
    from trainers.config import compose_tree
    from trainers.experiments.control import check_clone, merge_overrides
    from trainers.main import validate
    from trainers.run_dir import flatten

    parent = registry.get(parent_id)
    if parent is None:
        raise SystemExit(f"no experiment {parent_id}")
    parent_cfg, _ = validate(compose_tree(list(parent.overrides)))
    clone_cfg, _ = validate(compose_tree(merge_overrides(parent.overrides, changes)))
    check_clone(registry.get_meta("reference"), flatten(parent_cfg.to_dict()), flatten(clone_cfg.to_dict()),
                parent.step if warm_start else None)


def wait_for(registry: Registry, request: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (answer := registry.get_request(request)).state == "pending":
        if time.monotonic() > deadline:
            print(f"request {request}: no answer in {timeout_s:g} s (is the sweep running?)")
            return 1
        time.sleep(0.5)
    print(f"request {request} {answer.state}: {answer.answer}")
    return 0 if answer.state == "done" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="outputs/sweep", help="the sweep's directory (sweep.dir)")
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="experiments with their status and latest metrics")
    ls.add_argument("--json", action="store_true")
    for name in ("stop", "resume", "clone"):
        command = commands.add_parser(name)
        command.add_argument("id", type=int)
        command.add_argument("--wait", action="store_true", help="wait for the driver's answer")
        command.add_argument("--wait-s", type=float, default=1800.0)
        if name == "clone":
            command.add_argument("--set", action="append", default=[], metavar="OVERRIDE",
                                 help="a Hydra override the clone makes (repeatable)")
            command.add_argument("--warm-start", action="store_true",
                                 help="start from the parent's current adapter and optimizer (else from scratch)")
    args = parser.parse_args(argv)
    if not Registry.exists(args.dir):
        print(f"no sweep in {args.dir} (its sweep.db is missing)", file=sys.stderr)
        return 2
    registry = Registry(args.dir)
    if args.command == "ls":
        rows = listing(registry)
        print(json.dumps(rows, indent=2)) if args.json else print_table(rows)
        pending = registry.pending()
        if pending and not args.json:
            print("pending: " + "; ".join(f"{r.kind} {r.experiment} {' '.join(r.overrides)}".strip() for r in pending))
        return 0
    changes, warm = (args.set, args.warm_start) if args.command == "clone" else ([], False)
    if args.command == "clone":
        try:
            check_clone_here(registry, args.id, changes, warm)
        except ConfigError as err:
            print(f"invalid clone: {err}", file=sys.stderr)
            return 2
    request = registry.request(args.command, args.id, changes, warm)
    if args.wait:
        return wait_for(registry, request, args.wait_s)
    print(f"request {request} filed: the sweep's driver applies it between chunks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
