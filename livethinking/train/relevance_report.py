"""What the relevance demo leaves to look at: ``results.md`` (the stage table, the latency of
label-first against full CoT, example answers), ``stages.png`` and ``results.json``, each
written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from livethinking.data import write_text_atomic
from livethinking.train.demo_report import save_figure

__all__ = ["format_relevance_table", "plot_relevance_stages", "write_relevance_report"]


def format_relevance_table(rows: list[dict]) -> str:
    """Markdown: per stage the decoded label's accuracy and macro-F1, CumPT's (τ from the
    dev split), the likeliest label token's accuracy, tokens per
    response, and the latency of reading the label first against decoding the full CoT."""
    lines = ["| model | decoded acc. | decoded macro-F1 | CumPT acc. | CumPT macro-F1 | τ | "
             "argmax acc. | format | tokens / response | label first | full CoT | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cumpt = (f"{100 * r['cumpt_accuracy']:.1f}% | {100 * r['cumpt_macro_f1']:.1f} | "
                 f"{r['cumpt_tau']:.2f} | {100 * r['argmax_accuracy']:.1f}%"
                 if "cumpt_tau" in r else "– | – | – | –")
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {100 * r['macro_f1']:.1f} | "
                     f"{cumpt} | {100 * r['format']:.1f}% | {r['tokens_per_response']:.1f} | "
                     f"{r['label_first_ms']:.1f} ms | {r['full_cot_ms']:.0f} ms | "
                     f"{r['full_cot_ms'] / max(r['label_first_ms'], 1e-9):.0f}× |")
    return "\n".join(lines)


def _examples(rows: list[dict]) -> str:
    count = min(len(r["examples"]) for r in rows) if rows else 0
    parts = []
    for i in range(count):
        first = rows[0]["examples"][i]
        parts.append(f"### Query: {first['query']} (gold tier {first['label']})\n")
        for r in rows:
            answer = r["examples"][i]["answer"].strip().replace("```", "` ` `")
            parts.append(f"**{r['model']}**:\n\n```text\n{answer or '(no visible text)'}\n```\n")
    return "\n".join(parts)


def plot_relevance_stages(rows: list[dict], path: Path) -> Path | None:
    """One PNG: macro-F1 (decoded and CumPT), accuracy (decoded and CumPT) and latency
    (label first and full CoT) per stage; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r["model"].replace("after ", "").replace(" ", "\n", 1) for r in rows]
    panels = [("macro-F1 (%)", "macro_f1", "cumpt_macro_f1", 100.0),
              ("accuracy (%)", "accuracy", "cumpt_accuracy", 100.0),
              ("latency (ms)", "full_cot_ms", "label_first_ms", 1.0)]
    names = {"macro_f1": "decoded", "cumpt_macro_f1": "CumPT", "accuracy": "decoded",
             "cumpt_accuracy": "CumPT", "full_cot_ms": "full CoT", "label_first_ms": "label first"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    x = list(range(len(rows)))
    for ax, (title, a, b, scale) in zip(axes, panels):
        for offset, key, colour in ((-0.2, a, "#4c72b0"), (0.2, b, "#55a868")):
            values = [scale * r.get(key, 0.0) for r in rows]
            bars = ax.bar([i + offset for i in x], values, width=0.4, color=colour,
                          label=names[key])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Relevance demo (TaoSR1): held-out products, CoT SFT → pass@N DPO → GRPO")
    fig.tight_layout()
    return save_figure(fig, path)


def write_relevance_report(out: Path, results: dict) -> list[Path]:
    """``results.json``, ``results.md`` and ``stages.png`` under ``out``; the paths written."""
    rows = results["rows"]
    written = [out / "results.json", out / "results.md"]
    write_text_atomic(written[0], json.dumps(results, indent=2) + "\n")
    plot = plot_relevance_stages(rows, out / "stages.png")
    size = results["size"]
    post_cot = size.get("output_format", "post_cot") == "post_cot"
    records = results["records"]
    sections = [
        "# LiveThinking relevance demo (TaoSR1)", "",
        f"Size `{size['name']}`: " + ", ".join(f"{k}={v}" for k, v in size.items()
                                              if k != "name"),
        f"Queries: {records['train']} training, {records['dev']} dev (τ calibration), "
        f"{records['heldout']} held-out (dev and held-out products never appear in training); "
        f"total time {results['seconds']:.0f} s.", "",
        f"Format `{size.get('output_format', 'post_cot')}`: "
        + ("the label first, then the reasoning (TaoSR1's deployed form). " if post_cot else
           "the reasoning, then the label. ")
        + "Decoded: the label parsed from a greedy answer. CumPT: the label read from the "
        "label token's distribution over the four tiers — "
        + ("the first response token, in one forward — " if post_cot else
           "after the greedy reasoning — ")
        + "the highest tier k whose cumulative probability p_k + … + p_4 reaches τ, with τ "
        "chosen on the dev split for macro-F1. Latency: label first = time to first token "
        "(what reading a label-first answer costs); full CoT = TTFT + tokens × time per "
        "token.", "",
        "## Held-out queries", "", format_relevance_table(rows), ""]
    if plot is not None:
        sections += ["![the stages side by side](stages.png)", ""]
        written.append(plot)
    curves = sorted(p.relative_to(out).as_posix() for stage in ("sft", "dpo", "grpo")
                    for p in (out / stage / "plots").glob("*.png"))
    if curves:
        sections += ["## Training curves", "", *(f"![{Path(c).stem}]({c})" for c in curves), ""]
    sections += ["## Example answers (the same held-out queries for every stage)", "",
                 _examples(rows)]
    write_text_atomic(written[1], "\n".join(sections))
    return written
