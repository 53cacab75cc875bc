"""The report folder: results.json, CSV tables, PNG plots and a report.md that shows them.

``write_report(out, rows, config, overlap)`` takes the rows of a sweep (one per edit: method,
parameters, the fraction removed, ASR per variant, utility), the configuration, and overlap
tables by layer (``analysis.overlap_table``), and writes:

- ``results.json`` (everything, every draw of a control) and ``results.csv`` (one line per
  edit, numbers as numbers; a random control drawn several times is one line, the draws' mean
  with their count and range: ``pool_draws``);
- ``asr_utility.png``: ASR in each variant and utility against the fraction removed, weight-level
  and rank-level edits in separate rows of panels, every point labelled with its parameters,
  each random control beside its method (its draws' range as an error bar), the unedited model
  as a dashed line;
- ``<name>.csv`` and ``<name>.png`` per overlap table (heat maps, blocks × module types);
- ``report.md``: the configuration, the table and the figures.

Every file is written atomically. Plots need matplotlib (``pip install 'pyattr[plot]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import edits
from .analysis import heatmap, save_table
from .edits import row_edit, row_score
from .io import atomic_write

__all__ = [
    "flag_of",
    "markdown_table",
    "point_label",
    "pool_draws",
    "summary_rows",
    "target_of",
    "write_report",
]

# Each edit followed by its random control, in the plot's legend and colours.
ORDER = ["set_difference", "random_weights", "top", "orthogonal", "random_ranks", "actsvd_remove"]


def _label(edit: str) -> str:
    return edits.get(edit).label if edit in edits.names() else edit


def _control_of(edit: str) -> str | None:
    return edits.get(edit).control_of if edit in edits.names() else None


def _series(row: dict) -> str:
    edit, score = row_edit(row), row_score(row["params"])
    label = _label(edit)
    if not score:
        return label
    return f"{label} (as {score})" if _control_of(edit) else f"{label} ({score})"


def _percent(value: float) -> str:
    return f"{100 * value:g}%"


def point_label(row: dict) -> str:
    """The parameters of one point, short: "p=q=5%", "p=2%, q=5%", "keep 16/3", "r=1"."""
    p = row["params"]
    if "q" in p and p.get("p") is not None:
        if p["p"] == p["q"]:
            return f"p=q={_percent(p['q'])}"
        return f"p={_percent(p['p'])}, q={_percent(p['q'])}"
    if "q" in p:
        return f"q={_percent(p['q'])}"
    if "keep_u" in p:
        return f"keep {p['keep_u']}/{p['keep_s']}"
    if "r_u" in p:
        return f"r_u={p['r_u']}, r_s={p['r_s']}"
    if "r" in p:
        return f"r={p['r']}"
    return ", ".join(f"{k}={v}" for k, v in p.items())


FAR = 0.1  # a region or projection that achieves under a tenth of its target is flagged


def target_of(row: dict) -> tuple[float | None, str]:
    """What a point aimed at, as a fraction of its unit, and how it is read: "target" (the
    top-q weights, ActSVD's r of R) or "bound" (a set difference removes at most q; the
    orthogonal projection at most min(r_u, R − r_s) of R); None where the parameters are
    counts of a layer's ranks (no single fraction) or for controls and attacks."""
    edit, p = row_edit(row), row["params"]
    if edit == "top":
        return p["q"], "target"
    if edit == "set_difference":
        return p["q"], "bound"
    if edit == "orthogonal" and isinstance(p.get("r_u"), float) and isinstance(p["r_s"], float):
        return min(p["r_u"], 1 - p["r_s"]), "bound"
    if edit == "actsvd_remove" and isinstance(p.get("r"), float):
        return p["r"], "target"
    return None, ""


def flag_of(row: dict) -> str:
    """Why a point's achieved fraction should not be read as its target ("" when fine)."""
    target, kind = target_of(row)
    removed = row.get("removed")
    if target is None or not isinstance(removed, (int, float)) or target <= 0:
        return ""
    if removed < FAR * target:
        what = "nearly empty" if row_edit(row) == "set_difference" else "far below its " + kind
        return f"{what}: {100 * removed:.3g}% of {100 * target:.3g}%"
    return ""


def summary_rows(rows: list[dict]) -> list[dict]:
    """One flat row per point, numbers as numbers: edit, params, the fraction removed (of
    ``unit``: weights or ranks; empty for fine-tuning) beside its target or bound and a flag
    where it falls far short (``flag_of``), ASR per variant, and where present the
    second judge's ASR per variant with the two judges' agreement, utility and perplexity.
    A random control drawn several times is one row (``pool_draws``): the draws' means, their
    count (``draws``) and the widest range of one ASR variant over the draws (``ASR range``)."""
    rows = pool_draws(rows)
    drawn = any("draws" in r for r in rows)
    out = []
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        flat = {"edit": _label(row_edit(row)), "params": params}
        if drawn:
            span = [hi - lo for k, (lo, hi) in row.get("range", {}).items() if k.startswith("ASR")]
            flat["draws"] = row.get("draws", "")
            flat["ASR range"] = max(span) if span else ""
        tuned = row_edit(row) == "finetune"
        flat["removed"] = "" if tuned else row["removed"]
        flat["unit"] = "" if tuned else row["unit"]
        target, _ = target_of(row)
        flat["target"] = "" if target is None else target
        flat["flag"] = flag_of(row)
        flat |= {f"ASR {k}": v for k, v in row["asr"].items()}
        second = row.get("asr_second")
        if second:
            name = second["judge"]
            flat |= {f"ASR {k} ({name})": v for k, v in second["asr"].items()}
            flat["judge agreement"] = second["agreement"]
            if "kappa" in second:
                flat["Cohen's kappa"] = second["kappa"]
        for name, judged in list(row.get("judges", {}).items())[2:]:  # a third judge and on
            flat |= {f"ASR {k} ({name})": v for k, v in judged["asr"].items()}
            flat[f"Cohen's kappa ({name})"] = judged["kappa"]
        flat["utility"] = "" if row.get("utility") is None else row["utility"]
        if row.get("perplexity") is not None:
            flat["perplexity"] = row["perplexity"]
        out.append(flat)
    return out


def _mean(values: list):
    """The mean of numbers, key by key through dicts of the same keys; a value every draw has
    (a judge's name, the fraction removed) is kept exactly, anything else is the first draw's."""
    first = values[0]
    if all(isinstance(v, dict) for v in values) and all(v.keys() == first.keys() for v in values):
        return {k: _mean([v[k] for v in values]) for k in first}
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numbers and any(v != first for v in values):
        return sum(values) / len(values)
    return first  # the same in every draw (the fraction removed), exactly


def pool_draws(rows: list[dict]) -> list[dict]:
    """Rows with the draws of each random control (``sweep.draws_of``: the same edit and
    parameters but ``seed``) pooled into one row where the first draw was: every number the
    draws' mean (ASR, utility, the judges' figures, the fraction removed), ``seconds`` their
    sum, ``draws`` their count, and ``range``: the lowest and highest draw of each ASR variant
    and of utility. Other rows are returned as they are."""
    from .sweep import Point

    groups: dict[tuple, list[dict]] = {}
    order: list = []
    for row in rows:
        edit, params = row_edit(row), row["params"]
        if edits.is_control(edit, params) and "seed" in params:
            rest = {k: v for k, v in params.items() if k != "seed"}
            key = (edit, json.dumps(rest, sort_keys=True, default=str))
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(row)
        else:
            order.append(row)
    out = []
    for item in order:
        if isinstance(item, dict):
            out.append(item)
            continue
        draws = groups[item]
        pooled = {k: _mean([d[k] for d in draws]) for k in draws[0] if all(k in d for d in draws)}
        pooled["params"] = {k: v for k, v in draws[0]["params"].items() if k != "seed"}
        pooled["key"] = Point(item[0], pooled["params"]).key
        pooled["seconds"] = sum(d.get("seconds", 0.0) for d in draws)
        pooled["draws"] = len(draws)
        span = {f"ASR {v}": [d["asr"][v] for d in draws] for v in draws[0]["asr"]}
        if all(d.get("utility") is not None for d in draws):
            span["utility"] = [d["utility"] for d in draws]
        pooled["range"] = {k: [min(v), max(v)] for k, v in span.items()}
        out.append(pooled)
    return out


def _freezing(attacks: list[dict]) -> list[dict]:
    """The paper's freezing table: one row per frozen region (its name and parameters: two
    regions of one kind stay two rows), one column per attack (n pairs, steps), the vanilla ASR
    in each cell; a random region drawn several times (``draws``) is the mean of its draws."""
    table: dict[tuple, dict] = {}
    for r in pool_draws(attacks):
        p = r["params"]
        region = {k: v for k, v in p.items() if k not in ("frozen", "n", "steps")}
        params = ", ".join(f"{k}={v}" for k, v in region.items())
        first = {"frozen": p["frozen"], "params": params, "draws": r.get("draws", "")}
        row = table.setdefault((p["frozen"], params), first)
        steps = p.get("steps")
        column = f"n={p['n']}" + ("" if steps is None else f", {steps} step{'s' * (steps != 1)}")
        row[column] = r["asr"]["vanilla"]
    return list(table.values())


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table; fractions of weights or ranks as percentages, other floats
    with three decimals; the columns are every row's keys in the order first seen."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(row: dict, column: str) -> str:
        value = row.get(column, "")
        if column in ("removed", "target") and isinstance(value, float):
            return f"{value:.2%}"
        return _cell(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> Path:
    """One row of panels per unit (weights, ranks), one column per ASR variant and utility;
    every point labelled with its parameters, each control beside its method (drawn several
    times: the draws' mean with their range as an error bar), the baseline as a dashed line."""
    from ._plot import pyplot, save_png

    plt = pyplot()

    baseline = next((r for r in rows if row_edit(r) == "none"), None)
    points = [r for r in rows if row_edit(r) != "none"]
    units = [u for u in ("weights", "ranks") if any(r["unit"] == u for r in points)] or ["weights"]
    variants = list(rows[0]["asr"])
    columns = [(f"ASR, {v}", "ASR", f"ASR {v}", lambda r, v=v: r["asr"][v]) for v in variants]
    if all(r.get("utility") is not None for r in rows):
        columns.append(("utility", "utility (accuracy)", "utility", lambda r: r["utility"]))
    fig, axes = plt.subplots(
        len(units), len(columns), figsize=(4.0 * len(columns), 3.9 * len(units)), squeeze=False
    )

    def place(row: dict) -> tuple:
        """Each control right after its method: (kind of edit, score, control last)."""
        edit = row_edit(row)
        kind = _control_of(edit) or edit
        rank = ORDER.index(kind) if kind in ORDER else len(ORDER)
        return (rank, row_score(row["params"]), _control_of(edit) is not None)

    series = [
        (name, _control_of(row_edit(row)) is not None)
        for name, row in sorted(
            {_series(r): r for r in points}.items(), key=lambda kv: place(kv[1])
        )
    ]
    colours = plt.get_cmap("tab10")
    style = {}
    for i, (name, control) in enumerate(series):
        style[name] = {
            "color": colours(i % 10),
            "marker": "x" if control else "o",
            "linestyle": ":" if control else "-",
        }
    for u, unit in enumerate(units):
        for c, (title, ylabel, spanned, value) in enumerate(columns):
            ax = axes[u][c]
            if baseline is not None:
                ax.axhline(
                    value(baseline),
                    color="grey",
                    linestyle="--",
                    linewidth=1,
                    label="baseline (no edit)",
                )
            for name, _ in series:
                mine = sorted(
                    (r for r in points if _series(r) == name and r["unit"] == unit),
                    key=lambda r: (r["removed"], point_label(r)),
                )
                if not mine:
                    continue
                xs = [100 * r["removed"] for r in mine]
                ys = [value(r) for r in mine]
                distinct = len(set(xs)) == len(xs)  # never join two points at the same x
                kw = dict(style[name]) | ({} if distinct else {"linestyle": "none"})
                ax.plot(xs, ys, label=name, **kw)
                for x, y, r in zip(xs, ys, mine, strict=True):
                    if spanned in r.get("range", {}):  # a control's draws: their range
                        lo, hi = r["range"][spanned]
                        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], color=kw["color"], capsize=3)
                for x, y, r in zip(xs, ys, mine, strict=True):
                    ax.annotate(
                        point_label(r),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=6.5,
                        color=kw["color"],
                    )
            ax.set_title(f"{title}: {unit}", fontsize=10)
            ax.set_xlabel(f"% of {unit} removed")
            ax.set_ylabel(ylabel)
            ax.set_ylim(-0.03, 1.08)
            ax.grid(alpha=0.3)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    ncol = min(4, len(labels))
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(labels) - 1) // ncol), 1, 1))
    return save_png(fig, path, dpi=110)


def _lenses_section(out: Path, lenses: dict) -> list[str]:
    """The overlap map of every lens (``lenses["map"]``: ``overlap.overlap_map`` rows, with
    ``"direction"``: the chosen candidate's fields and ``"probe_top"``: the best heads when
    known): its table, its figure, and what the direction and the probes found."""
    from .overlap import plot_overlap

    rows = lenses["map"]
    save_table(rows, out / "overlap_map.csv")
    plot_overlap(rows, out / "overlap_map.png", title=lenses.get("title", ""))
    lines = ["## One overlap map: refusal direction, ranks, weights and heads", ""]
    chosen = lenses.get("direction")
    if chosen:
        lines.append(
            f"Refusal direction (difference of means, chosen on held-out prompts): block "
            f"{chosen['layer']}, position {chosen['position']}; refusal score of harmful "
            f"prompts with it ablated {chosen['bypass']:.2f}, of harmless prompts with it "
            f"added {chosen['induce']:.2f}, KL on harmless prompts {chosen['kl']:.3f}."
        )
    if lenses.get("probe_top"):
        heads = ", ".join(f"({b}, {h})" for b, h in lenses["probe_top"])
        lines.append(f"Best heads by probe accuracy (block, head): {heads}.")
    lines += ["", markdown_table(rows), "", "![overlap map](overlap_map.png)", ""]
    return lines


def write_report(
    out: str | Path,
    rows: list[dict],
    config: dict,
    overlap: dict[str, tuple[list[dict], str]] | None = None,
    lenses: dict | None = None,
) -> Path:
    """Write the report folder; returns the path of report.md. ``lenses``: the overlap map of
    every lens (see ``_lenses_section``), kept in results.json for ``pyattr report``."""
    out = Path(out)
    if not rows:
        raise ValueError("no results to report")
    overlap = overlap or {}
    payload = {"config": config, "results": rows}
    payload["overlap"] = {name: table for name, (table, _) in overlap.items()}
    payload["overlap_titles"] = {name: title for name, (_, title) in overlap.items()}
    if lenses:
        payload["lenses"] = lenses
    atomic_write(out / "results.json", (json.dumps(payload, indent=1) + "\n").encode())
    flat = summary_rows(rows)
    save_table(flat, out / "results.csv")
    changed = [r for r in rows if row_edit(r) != "finetune"]
    attacks = [r for r in rows if row_edit(r) == "finetune"]
    _plot(pool_draws(changed), out / "asr_utility.png")
    freezing = _freezing(attacks)
    if freezing:
        save_table(freezing, out / "freezing.csv")
    flagged = [
        f"{_label(row_edit(r))} ({point_label(r)}) {flag_of(r)}; it is not the region asked for"
        for r in changed
        if flag_of(r)
    ]
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
            "## Notes" if config.get("notes") or flagged else "",
            "",
            *(f"- {note}" for note in config.get("notes", [])),
            *(f"- **Flagged**: {label}" for label in flagged),
            "",
            "## Results",
            "",
            markdown_table(summary_rows(changed)),
            "",
            "![ASR and utility against the fraction removed](asr_utility.png)",
            "",
            "## Fine-tuning attacks with frozen weights (ASR, vanilla)" if freezing else "",
            "",
            markdown_table(freezing) if freezing else "",
            "",
            "## Overlap between safety and utility" if figures else "",
            "",
            *figures,
            *(_lenses_section(out, lenses) if lenses else []),
        ]
    )
    return atomic_write(out / "report.md", text.encode())
