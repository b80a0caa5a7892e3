"""Run metrics: one JSON line per logged step, TensorBoard scalars, PNG plots at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["MetricsLogger", "plot_metrics", "read_metrics"]


class MetricsLogger:
    """Appends ``{"step": s, ...}`` lines to ``metrics.jsonl`` (flushed per line). On resume
    from step s, lines after s (logged past the last checkpoint) are dropped first."""

    def __init__(self, output_dir, *, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                            purge_step=resume_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path, out_dir, groups: dict[str, list[str]]) -> list[Path]:
    """One PNG per group (title -> metric keys) of the metrics file; missing keys skipped.
    Returns the written files (none when matplotlib is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for title, keys in groups.items():
        present = [k for k in keys if any(k in r for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in present:
            points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key, marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{title.lower().replace(' ', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
