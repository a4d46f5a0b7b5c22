"""Which experiments a pruning rule stops, decided between chunks from their evaluations.

Successive halving (asynchronous, as in ASHA): rung k lies at ``min_chunks * eta**k`` chunks.
An experiment that reaches a rung is judged against every score recorded at that rung so far
(its own round's and earlier arrivals', pruned or not): it goes on if it ranks in the best
``ceil(n / eta)`` of those ``n``. Experiments that start together reach each rung in the same
round and are judged together, which is exactly synchronous successive halving (4 -> 2 -> 1
with eta 2); a clone or a resumed experiment arriving later meets the recorded scores. A
decision, once taken, is kept (``Registry.decide``): resuming a pruned experiment overrides it.

Ranking: the metric (higher is better), then the training reward of the rung's step, then the
older experiment. The rows are what ``trainers.tracking`` wrote (``metrics.jsonl``); only a
row that trained and evaluated counts (a clone's starting evaluation does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainers.experiments.config import HalvingConfig

TIEBREAK = "reward/mean"


@dataclass(frozen=True)
class Score:
    experiment: int
    value: float  # the metric at the rung
    tiebreak: float  # the training reward of the rung's step

    def rank_key(self) -> tuple:
        return (-self.value, -self.tiebreak, self.experiment)


def rung_steps(cfg: HalvingConfig, chunk_steps: int, max_step: int) -> list[int]:
    """The steps at which rungs lie, up to ``max_step``."""
    steps, chunks = [], cfg.min_chunks
    while chunks * chunk_steps <= max_step:
        steps.append(chunks * chunk_steps)
        chunks *= cfg.eta
    return steps


def score_at(rows: list[dict], step: int, metric: str) -> tuple[float, float] | None:
    """(metric, tiebreak) of the row of ``step`` if that step trained and evaluated."""
    for row in rows:
        if row["step"] == step and isinstance(row.get(metric), (int, float)) and TIEBREAK in row:
            return float(row[metric]), float(row[TIEBREAK])
    return None


def judge(scores: list[Score], newcomers: set[int], eta: int) -> dict[int, bool]:
    """Whether each newcomer goes on: it is among the best ceil(n / eta) of the n ``scores``."""
    ranked = sorted(scores, key=Score.rank_key)
    kept = {s.experiment for s in ranked[: math.ceil(len(ranked) / eta)]}
    return {e: e in kept for e in newcomers}


def halving_decisions(cfg: HalvingConfig, chunk_steps: int, metric: str, rows: dict[int, list[dict]],
                      candidates: set[int], decided: set[tuple[int, int]]) -> list[tuple[int, int, bool, str]]:
    """New decisions (experiment, rung, kept, why) for the ``candidates`` (active experiments)
    that reached a rung they were not judged at; ``rows`` are every experiment's metric rows."""
    max_step = max((r["step"] for exp_rows in rows.values() for r in exp_rows), default=0)
    out = []
    for rung, step in enumerate(rung_steps(cfg, chunk_steps, max_step)):
        scores = []
        for experiment, exp_rows in rows.items():
            found = score_at(exp_rows, step, metric)
            if found is not None:
                scores.append(Score(experiment, *found))
        newcomers = {s.experiment for s in scores if s.experiment in candidates and (s.experiment, rung) not in decided}
        if not newcomers:
            continue
        ranked = sorted(scores, key=Score.rank_key)
        for experiment, kept in sorted(judge(scores, newcomers, cfg.eta).items()):
            place = [s.experiment for s in ranked].index(experiment) + 1
            why = (f"successive halving at step {step}: {metric}={ranked[place - 1].value:.4g}, "
                   f"rank {place} of {len(ranked)}, the best {math.ceil(len(ranked) / cfg.eta)} go on")
            out.append((experiment, rung, kept, why))
    return out
