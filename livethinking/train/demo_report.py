"""What the demo leaves to look at: the stage table, the cost tables, example answers
(``results.md``), one PNG with the three stages side by side (``stages.png``) and every
number (``results.json``). Every file is written atomically (a reader never sees half)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from livethinking.data import write_text_atomic

__all__ = ["format_table", "plot_stages", "save_figure", "write_report"]

PLOT_PANELS = (("correct", "correct (%)", 100.0), ("helpful", "helpful (%)", 100.0),
               ("tokens_per_response", "tokens per answer", 1.0),
               ("latency_ms", "full-answer latency (ms)", 1.0))


def format_table(rows: list[dict]) -> str:
    """Markdown: per stage correct %, helpful %, tokens per response, TTFT, TPOT, full-answer
    latency (TTFT + tokens × TPOT) and the reference answers' log-likelihood per token."""
    lines = ["| model | correct | helpful | tokens / response | TTFT | TPOT | answer latency | "
             "ref. log-lik. / token |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {100 * r['correct']:.1f}% | {100 * r['helpful']:.1f}% | "
                     f"{r['tokens_per_response']:.1f} | {r['ttft_ms']:.1f} ms | "
                     f"{r['tpot_ms']:.2f} ms | {r['latency_ms']:.0f} ms | "
                     f"{r['reference_log_likelihood']:.3f} |")
    return "\n".join(lines)


def format_examples(rows: list[dict]) -> str:
    """Markdown: each held-out question once, then every stage's answer to it in a fenced
    block (so ``<think>`` shows as text)."""
    count = min(len(r["examples"]) for r in rows) if rows else 0
    parts = []
    for i in range(count):
        parts.append(f"### Example {i + 1}: {rows[0]['examples'][i]['question']}\n")
        for r in rows:
            answer = r["examples"][i]["answer"].strip()
            shown = answer.replace("```", "` ` `") or "(no visible text)"
            parts.append(f"**{r['model']}** ({len(answer)} characters):\n\n```text\n{shown}\n"
                         "```\n")
    return "\n".join(parts)


def plot_stages(rows: list[dict], path: Path) -> Path | None:
    """One PNG: correct, helpful, tokens per answer and full-answer latency, one bar per
    stage in each panel (None when matplotlib is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r["model"].replace(" ", "\n", 1) for r in rows]
    fig, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(4 * len(PLOT_PANELS), 3.6))
    for ax, (key, title, scale) in zip(axes, PLOT_PANELS):
        values = [scale * r[key] for r in rows]
        bars = ax.bar(labels, values, color=["#9e9e9e", "#4c72b0", "#55a868"][:len(rows)])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(title)
        if scale == 100.0:  # a percentage
            ax.set_ylim(0, 105)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("LiveThinking demo: held-out products, before training → RFT → GRPO")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as a PNG atomically (a temporary file, then a rename) and
    close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_report(out: Path, results: dict, cost_markdown: str, notes: list[str]) -> list[Path]:
    """Write ``results.json`` (``results`` as is), ``results.md`` (linking ``stages.png`` and
    the training plots under ``out/rft/plots`` and ``out/grpo/plots``) and ``stages.png``
    under ``out``; returns the paths written."""
    rows = results["rows"]
    written = [out / "results.json", out / "results.md"]
    write_text_atomic(written[0], json.dumps(results, indent=2) + "\n")
    plot = plot_stages(rows, out / "stages.png")
    sections = ["# LiveThinking demo", "", *notes, "", "## Held-out products", "",
                format_table(rows), "", "## Cost per answer", "", cost_markdown, ""]
    if plot is not None:
        sections += ["![the three stages side by side](stages.png)", ""]
        written.append(plot)
    curves = sorted(p.relative_to(out).as_posix() for stage in ("rft", "grpo")
                    for p in (out / stage / "plots").glob("*.png"))
    if curves:
        sections += ["## Training curves", "", *(f"![{Path(c).stem}]({c})" for c in curves), ""]
    sections += ["## Example answers (the same held-out questions for every stage)", "",
                 format_examples(rows)]
    write_text_atomic(written[1], "\n".join(sections))
    return written
