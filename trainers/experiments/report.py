"""What a sweep shows: a comparison plot after every chunk and a summary table naming the best.

The plot (``<sweep dir>/comparison.png``) has one line per experiment: training reward and the
held-out metric against the step; pruned and stopped experiments are dashed and end in a
cross. The table ranks the experiments by the metric of their latest evaluation (then by the
training reward, then the older one); pruned and failed ones never win.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainers.experiments.registry import ExperimentRecord

PLOT_FILE = "comparison.png"
ENDED_EARLY = ("pruned", "stopped", "failed")
CANNOT_WIN = ("pruned", "failed")


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else None


def label(record: ExperimentRecord) -> str:
    diff = " ".join(f"{k}={v}" for k, v in record.diff.items())
    origin = f" (clone of {record.parent}{', warm' if record.warm_start else ''})" if record.parent is not None else ""
    return f"{record.id}: {diff or 'base'}{origin}"


def comparison_plot(records: list[ExperimentRecord], rows: dict[int, list[dict]], metric: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward_ax, metric_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for i, record in enumerate(records):
        color, ended = f"C{i % 10}", record.status in ENDED_EARLY
        for ax, key in ((reward_ax, "reward/mean"), (metric_ax, metric)):
            points = [(r["step"], r[key]) for r in rows.get(record.id, []) if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            name = label(record) + (f" [{record.status}]" if ended else "")
            ax.plot(*zip(*points), color=color, linestyle="--" if ended else "-",
                    marker="o" if key == metric else None, markersize=3, label=name)
            if ended:
                ax.plot(*points[-1], color=color, marker="x", markersize=10, markeredgewidth=2)
    reward_ax.set_title("training reward")
    metric_ax.set_title(f"held-out {metric.removeprefix('eval/')}")
    for ax in (reward_ax, metric_ax):
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    metric_ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def ranking(records: list[ExperimentRecord], rows: dict[int, list[dict]], metric: str) -> list[dict]:
    """One entry per experiment, best first (module docstring)."""
    table = []
    for record in records:
        exp_rows = rows.get(record.id, [])
        table.append({"id": record.id, "config": label(record), "status": record.status, "step": record.step,
                      "metric": latest(exp_rows, metric), "reward": latest(exp_rows, "reward/mean"),
                      "note": record.note})

    def key(entry: dict) -> tuple:
        return (entry["status"] in CANNOT_WIN, entry["metric"] is None, -(entry["metric"] or 0.0),
                -(entry["reward"] or 0.0), entry["id"])

    return sorted(table, key=key)


def summary_table(table: list[dict], metric: str) -> str:
    """The ranking as a Markdown table; the first row is the best."""
    lines = [f"| | experiment | status | steps | {metric} | reward |", "|---|---|---|---|---|---|"]
    for i, e in enumerate(table):
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"| {'best' if i == 0 else ''} | {e['config']} | {e['status']} | {e['step']} | "
                     f"{fmt(e['metric'])} | {fmt(e['reward'])} |")
    return "\n".join(lines)
