"""Where a run's metrics go: a JSONL file, W&B, a PNG plot, and the console.

On a terminal the console holds a progress bar carrying the latest step's figures, with a
line per evaluation above it; elsewhere (a log file, CI) it gets one line per step.

The JSONL file is the source of truth (W&B is a view of it): one object per step, appended and
flushed as soon as the step ends. On resume from step k the lines of steps after k (written
before the crash but not covered by a checkpoint) are dropped, so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlcore.validation import check_choice

# Console line: the handful of numbers a researcher watches, in this order, when present.
CONSOLE_KEYS = (
    ("reward/mean", "reward"),
    ("eval/acc_greedy", "acc"),
    ("response/length_mean", "len"),
    ("loss/policy", "loss"),
    ("loss/clip_frac", "clip"),
    ("correction/mismatch_kl", "mkl"),
    ("optim/grad_norm", "gnorm"),
    ("time/step", "s"),
)


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"  # offline (no account or network needed) | online | disabled
    wandb_project: str = "trillora"
    wandb_entity: str | None = None
    run_name: str | None = None
    plot: bool = True
    console: bool = True

    def __post_init__(self) -> None:
        check_choice("logger.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsTracker:
    """Writes each step's metrics to JSONL, W&B and the console; draws the plot on demand."""

    def __init__(self, run_dir: str | Path, cfg: LoggerConfig, run_config: dict, resume_step: int | None,
                 total_steps: int | None = None, group: str | None = None, name: str | None = None,
                 label: str = ""):
        """``group``/``name``: the W&B group and run name (a sweep's experiments); ``label``
        starts each console line (which experiment it is)."""
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.group, self.name, self.label = group, name or cfg.run_name, label
        self._bar = None
        if cfg.console and sys.stdout.isatty() and total_steps:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, desc="RL steps", unit="step",
                             dynamic_ncols=True, file=sys.stdout)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.plot_path = self.run_dir / "progress.png"
        self._truncate_after(resume_step)
        self.wandb_run = self._init_wandb(run_config) if cfg.wandb_mode != "disabled" else None

    def _truncate_after(self, resume_step: int | None) -> None:
        if not self.jsonl_path.exists():
            return
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            if line.strip() and (resume_step is not None and json.loads(line)["step"] <= resume_step):
                kept.append(line)
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def _init_wandb(self, run_config: dict):
        import wandb

        run_id_file = self.run_dir / "wandb_run_id"
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:12]
        run_id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=self.name,
            group=self.group,
            id=run_id,
            resume="allow",
            reinit="create_new",  # a sweep keeps one run per experiment open in this process
            mode=self.cfg.wandb_mode,
            dir=str(self.run_dir),
            config=run_config,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if self._bar is not None:
            if step > 0:
                self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(self.console_line(step, metrics).split(" | ", 1)[-1], refresh=True)
            if any(key.startswith("eval/") for key in metrics):
                self._bar.write(self.console_line(step, metrics))
        elif self.cfg.console:
            print(self.label + self.console_line(step, metrics), flush=True)

    @staticmethod
    def console_line(step: int, metrics: dict[str, Any]) -> str:
        parts = [f"step {step:>4d}"]
        for key, label in CONSOLE_KEYS:
            if key in metrics:
                parts.append(f"{label} {float(_plain(metrics[key])):.4g}")
        return " | ".join(parts)

    def rows(self) -> list[dict[str, Any]]:
        if not self.jsonl_path.exists():
            return []
        return [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()]

    def draw_plot(self) -> Path | None:
        """Reward and held-out accuracy per step, as a PNG next to the JSONL file."""
        if not self.cfg.plot:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("reward/mean", "train reward"), ("eval/acc_greedy", "held-out acc (greedy)"),
                           ("eval/acc_sampled", "held-out acc (sampled)")):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)
        return self.plot_path

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.draw_plot()
        if self.wandb_run is not None:
            self.wandb_run.finish()
