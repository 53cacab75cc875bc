"""The report folder: results.json, CSV tables, PNG plots and a report.md that shows them.

``write_report(out, rows, config, overlap)`` takes the rows of a sweep (one per edit: method,
parameters, the fraction removed, ASR per variant, utility), the configuration, and overlap
tables by layer (``analysis.overlap_table``), and writes:

- ``results.json`` (everything) and ``results.csv`` (one line per edit);
- ``asr_utility.png``: ASR in each variant and utility against the fraction removed, one
  series per method;
- ``<name>.csv`` and ``<name>.png`` per overlap table (heat maps, blocks × module types);
- ``report.md``: the configuration, the table and the figures.

Every file is written atomically. Plots need matplotlib (``pip install 'pyattr[plot]'``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from .analysis import heatmap, save_table
from .artifacts import atomic_write

__all__ = ["summary_rows", "write_report"]

LABELS = {
    "none": "baseline",
    "top": "top safety weights",
    "set_difference": "set difference",
    "random_weights": "random weights",
    "actsvd_remove": "ActSVD: top safety ranks removed",
    "orthogonal": "orthogonal projection",
    "random_ranks": "random directions",
    "finetune": "fine-tuning attack",
}


def _series(row: dict) -> str:
    method = row["params"].get("method")
    label = LABELS.get(row["method"], row["method"])
    return f"{label} ({method})" if method else label


def summary_rows(rows: list[dict]) -> list[dict]:
    """One flat row per edit: edit, removed, ASR per variant, utility."""
    out = []
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        flat = {"edit": LABELS.get(row["method"], row["method"]), "params": params}
        flat["removed"] = (
            "nothing (fine-tuned)"
            if row["method"] == "finetune"
            else f"{row['removed']:.2%} of {row['unit']}"
        )
        flat |= {f"ASR {k}": f"{v:.2f}" for k, v in row["asr"].items()}
        utility = row.get("utility")
        flat["utility"] = "" if utility is None else f"{utility:.3f}"
        out.append(flat)
    return out


def _freezing(attacks: list[dict]) -> list[dict]:
    """The paper's freezing table: one row per frozen region, one column per n."""
    table: dict[str, dict] = {}
    for r in attacks:
        row = table.setdefault(r["params"]["frozen"], {"frozen": r["params"]["frozen"]})
        row[f"n={r['params']['n']}"] = f"{r['asr']['vanilla']:.2f}"
    return list(table.values())


def _markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(rows[0]["asr"])
    panels = [(f"ASR, {v}", lambda r, v=v: r["asr"][v]) for v in variants]
    if all(r.get("utility") is not None for r in rows):
        panels.append(("utility", lambda r: r["utility"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.0), sharex=True)
    series = sorted({_series(r) for r in rows})
    markers = "osD^v<>ph*"
    for ax, (title, value) in zip(axes, panels, strict=True):
        for i, name in enumerate(series):
            mine = sorted((r for r in rows if _series(r) == name), key=lambda r: r["removed"])
            xs = [100 * r["removed"] for r in mine]
            ax.plot(xs, [value(r) for r in mine], marker=markers[i % len(markers)], label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("removed (% of weights or ranks)")
        if title.startswith("ASR") or title == "utility":
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 5), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def write_report(
    out: str | Path,
    rows: list[dict],
    config: dict,
    overlap: dict[str, tuple[list[dict], str]] | None = None,
) -> Path:
    """Write the report folder; returns the path of report.md."""
    out = Path(out)
    if not rows:
        raise ValueError("no results to report")
    overlap = overlap or {}
    payload = {"config": config, "results": rows}
    payload["overlap"] = {name: table for name, (table, _) in overlap.items()}
    atomic_write(out / "results.json", (json.dumps(payload, indent=1) + "\n").encode())
    flat = summary_rows(rows)
    save_table(flat, out / "results.csv")
    edits = [r for r in rows if r["method"] != "finetune"]
    attacks = [r for r in rows if r["method"] == "finetune"]
    _plot(edits, out / "asr_utility.png")
    freezing = _freezing(attacks)
    if freezing:
        save_table(freezing, out / "freezing.csv")
    figures = []
    for name, (table, title) in overlap.items():
        save_table(table, out / f"{name}.csv")
        heatmap(table, out / f"{name}.png", title=title)
        figures.append(f"### {title}\n\n![{name}]({name}.png)\n")
    text = "\n".join(
        [
            "# pyattr report",
            "",
            "## Configuration",
            "",
            "```json",
            json.dumps(config, indent=1),
            "```",
            "",
            "## Results",
            "",
            _markdown(summary_rows(edits)),
            "",
            "![ASR and utility against the fraction removed](asr_utility.png)",
            "",
            "## Fine-tuning attacks with frozen weights (ASR, vanilla)" if freezing else "",
            "",
            _markdown(freezing) if freezing else "",
            "",
            "## Overlap between safety and utility" if figures else "",
            "",
            *figures,
        ]
    )
    return atomic_write(out / "report.md", text.encode())
