"""Difficulty-aware prompt sampling for GRPO (TaoSR1's third stage; ROLL's difficulty mask).

A prompt's accuracy p is the fraction of its samples the correctness judge scores 1. A
prompt with p ≤ low (hopeless: every group all wrong) or p ≥ high (solved: all right)
gives GRPO no advantage to learn from, so only prompts with low < p < high are drawn; a
prompt never estimated is drawn. The offline estimate comes from N samples per prompt of
the starting model (or a file of ``{"id", "accuracy"}`` lines, e.g. DPO's pass@N); online,
each rollout group's accuracy replaces its prompt's estimate.
"""

from __future__ import annotations

from livethinking.train.config import DifficultyConfig

__all__ = ["DifficultyFilter", "read_accuracies"]

HISTOGRAM_BINS = 5  # accuracy histogram: [0, 0.2), [0.2, 0.4), …, [0.8, 1.0]


def read_accuracies(path, ids) -> dict[str, float]:
    """``{id: accuracy}`` from JSON lines ``{"id", "accuracy"}``, keeping ``ids`` only;
    errors name the file, the line and the field."""
    from livethinking.data import load_json_lines

    def parse(row: object) -> tuple[str, float]:
        accuracy = row.get("accuracy") if isinstance(row, dict) else None
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) \
                or not 0 <= accuracy <= 1:
            raise ValueError("accuracy must be a number in [0, 1]")
        if not isinstance(row.get("id"), str):
            raise ValueError("id must be a string")
        return row["id"], float(accuracy)

    wanted = set(ids)
    return {i: a for i, a in load_json_lines(path, parse).items if i in wanted}


class DifficultyFilter:
    """Which prompts GRPO may draw: ``keeps(id)`` iff its accuracy estimate lies strictly
    inside (low, high) or it has none. ``update`` replaces estimates; ``stats`` reports the
    kept fraction of all prompts and the histogram of the estimates."""

    def __init__(self, config: DifficultyConfig, ids: list[str]) -> None:
        self.config, self.ids = config, list(ids)
        self.accuracy: dict[str, float] = {}

    def keeps(self, record_id: str) -> bool:
        p = self.accuracy.get(record_id)
        return p is None or self.config.low < p < self.config.high

    def update(self, accuracies: dict[str, float]) -> None:
        self.accuracy.update(accuracies)

    def kept_fraction(self) -> float:
        return sum(self.keeps(i) for i in self.ids) / max(1, len(self.ids))

    def stats(self) -> dict[str, float]:
        """``difficulty/kept_fraction``, ``difficulty/estimated_fraction`` and
        ``difficulty/acc_{lo}-{hi}``: the fraction of estimated prompts per accuracy bin."""
        values = [self.accuracy[i] for i in self.ids if i in self.accuracy]
        counts = [0] * HISTOGRAM_BINS
        for p in values:
            counts[min(int(p * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        width = 1.0 / HISTOGRAM_BINS
        out = {"difficulty/kept_fraction": self.kept_fraction(),
               "difficulty/estimated_fraction": len(values) / max(1, len(self.ids))}
        for b, count in enumerate(counts):
            out[f"difficulty/acc_{b * width:.1f}-{(b + 1) * width:.1f}"] = (
                count / max(1, len(values)))
        return out

    def state(self) -> dict[str, float]:
        return dict(self.accuracy)

    def load_state(self, state: dict[str, float]) -> None:
        self.accuracy = {str(k): float(v) for k, v in state.items()}
