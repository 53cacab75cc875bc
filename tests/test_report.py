"""The report folder from result rows: numbers stay numbers, every point is labelled, weight- and
rank-level edits get separate panels, controls sit beside their methods, the freezing table."""

from __future__ import annotations

import csv
import json

import pytest

from pyattr.report import markdown_table, point_label, summary_rows, write_report

ASR = {"vanilla": 0.1, "no_system": 0.2}


def row(method: str, params: dict, removed: float, unit: str = "weights", **extra) -> dict:
    key = f"{method}({params})"
    head = {"key": key, "method": method, "params": params, "removed": removed, "unit": unit}
    return head | {"asr": dict(ASR), "utility": 0.9, "seconds": 1.5} | extra


FROZEN = {"n": 10, "steps": 1, "frozen": "random_weights", "p": 0.05, "q": 0.05}
ROWS = [
    row("none", {}, 0.0),
    row("set_difference", {"method": "wanda", "p": 0.05, "q": 0.05}, 0.024),
    row("set_difference", {"method": "wanda", "p": 0.02, "q": 0.05}, 0.031),
    row("random_weights", {"like": "wanda", "p": 0.05, "q": 0.05}, 0.024),
    row("orthogonal", {"keep_u": 16, "keep_s": 3}, 0.0234, "ranks"),
    row("orthogonal", {"keep_u": 12, "keep_s": 3}, 0.0234, "ranks"),
    row("random_ranks", {"keep_u": 16, "keep_s": 3}, 0.0234, "ranks"),
    row("actsvd_remove", {"r": 1}, 0.0078, "ranks"),
    row("finetune", {"n": 10, "steps": 5, "frozen": "none"}, 0.0),
    row("finetune", {"n": 10, "steps": 5, "frozen": "set_difference"}, 0.0),
    row("finetune", {"n": 100, "steps": 40, "frozen": "none"}, 0.0),
    *(  # two draws of the freeze's control
        row("finetune", FROZEN | {"seed": k}, 0.0, asr=dict.fromkeys(ASR, a))
        for k, a in enumerate((0.1, 0.3))
    ),
]


def test_point_labels_say_the_parameters():
    labels = [point_label(r) for r in ROWS[1:8]]
    assert labels == [
        "p=q=5%",
        "p=2%, q=5%",
        "p=q=5%",
        "keep 16/3",
        "keep 12/3",
        "keep 16/3",
        "r=1",
    ]
    assert point_label(row("orthogonal", {"r_u": 112, "r_s": 125}, 0.02)) == "r_u=112, r_s=125"


def test_summary_rows_hold_numbers_and_the_second_judge():
    second = {"judge": "keyword", "asr": {"vanilla": 0.5, "no_system": 0.6}, "agreement": 0.75}
    flat = summary_rows([ROWS[1] | {"asr_second": second}, ROWS[8]])
    assert flat[0]["removed"] == 0.024 and flat[0]["unit"] == "weights"
    assert flat[0]["ASR vanilla"] == 0.1 and flat[0]["ASR vanilla (keyword)"] == 0.5
    assert flat[0]["judge agreement"] == 0.75 and flat[0]["utility"] == 0.9
    assert flat[1]["removed"] == "" and flat[1]["unit"] == ""  # fine-tuning removes nothing
    text = markdown_table(flat)
    assert "| 2.40% |" in text and "| 0.100 |" in text and "| 0.750 |" in text


def test_achieved_fractions_sit_beside_their_targets_and_far_misses_are_flagged(tmp_path):
    """issue 17: a region or projection far from what was asked (a set difference that comes
    out nearly empty) is flagged in the table and the report, never silently used."""
    pytest.importorskip("matplotlib")
    rows = [
        ROWS[0],
        row("top", {"score": "wanda", "q": 0.03}, 0.0298),
        row("set_difference", {"score": "snip", "p": 0.03, "q": 0.03}, 0.0003),
        row("set_difference", {"score": "wanda", "p": 0.01, "q": 0.03}, 0.021),
        row("orthogonal", {"r_u": 0.73, "r_s": 0.977}, 0.0001, "ranks"),
        row("orthogonal", {"r_u": 0.73, "r_s": 0.977}, 0.021, "ranks"),
        row("orthogonal", {"keep_u": 16, "keep_s": 3}, 0.0, "ranks"),
    ]
    flat = summary_rows(rows)
    approx = pytest.approx(0.023)
    assert [f["target"] for f in flat] == ["", 0.03, 0.03, 0.03, approx, approx, ""]
    assert [bool(f["flag"]) for f in flat] == [False, False, True, False, True, False, False]
    assert flat[2]["flag"] == "nearly empty: 0.03% of 3%"
    assert flat[4]["flag"].startswith("far below its bound")
    text = write_report(tmp_path, rows, {}).read_text()
    assert text.count("**Flagged**") == 2 and "nearly empty: 0.03% of 3%" in text
    assert "| 3.00% | nearly empty" in text


def test_report_folder(tmp_path):
    pytest.importorskip("matplotlib")
    config = {"judge": "toy-exact", "prepare_s": 2.0}
    path = write_report(tmp_path, ROWS, config)
    assert path == tmp_path / "report.md"
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["removed"]) == 0.024 and float(table[1]["ASR vanilla"]) == 0.1
    assert len(table) == len(ROWS) - 1  # the freeze control's two draws: one row
    assert table[-1]["draws"] == "2" and float(table[-1]["ASR vanilla"]) == pytest.approx(0.2)
    freezing = list(csv.DictReader((tmp_path / "freezing.csv").open()))

    def cells(*values: str) -> dict:
        return dict(zip(("n=10, 5 steps", "n=100, 40 steps", "n=10, 1 step"), values, strict=True))

    assert freezing == [
        {"frozen": "none", "params": "", "draws": "", **cells("0.1", "0.1", "")},
        {"frozen": "set_difference", "params": "", "draws": "", **cells("0.1", "", "")},
        {  # a region of another kind or parameters: a row of its own, its draws' mean
            "frozen": "random_weights",
            "params": "p=0.05, q=0.05",
            "draws": "2",
            **cells("", "", "0.2"),
        },
    ]
    png = (tmp_path / "asr_utility.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(tmp_path / "asr_utility.png").shape[:2]
    assert height > 700 and width > 1000  # two rows of panels: weights and ranks
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"] == config and len(payload["results"]) == len(ROWS)
    report = path.read_text()
    assert "![ASR and utility" in report and "with frozen weights" in report
    with pytest.raises(ValueError, match="no results"):
        write_report(tmp_path, [], config)


def test_re_rendering_keeps_the_overlap_and_the_timings(tmp_path):
    """`pyattr report --results results.jsonl` rewrites the report from the table without
    losing what only the finished run wrote (overlap tables and their titles, timings), and
    reads a table whose last line an interruption cut."""
    pytest.importorskip("matplotlib")
    from pyattr.__main__ import main

    config = {"judge": "toy-exact", "total_s": 12.5}
    overlap = {"jaccard": ([{"layer": "a", "block": 0, "module": "q", "value": 0.2}], "Jaccard")}
    write_report(tmp_path, ROWS, config, overlap)
    lines = [json.dumps({"format": "pyattr.results/1", "config": {"judge": "toy-exact"}})]
    lines += [json.dumps(r) for r in ROWS] + ['{"key": "cut']
    (tmp_path / "results.jsonl").write_text("\n".join(lines))
    assert main(["report", "--results", str(tmp_path / "results.jsonl")]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["total_s"] == 12.5 and payload["overlap"]["jaccard"][0]["value"] == 0.2
    assert len(payload["results"]) == len(ROWS)
    report = (tmp_path / "report.md").read_text()
    assert "### Jaccard" in report and (tmp_path / "jaccard.png").exists()


def test_a_controls_draws_are_pooled_into_their_mean_and_range(tmp_path):
    """A random control drawn several times (``sweep.draws_of``) is one row of the table, the
    CSV and the figure: the draws' mean, their count and range; results.json keeps each draw."""
    pytest.importorskip("matplotlib")
    from pyattr.report import pool_draws

    like = {"score": "wanda", "p": 0.05, "q": 0.05}
    second = {"judge": "keyword", "agreement": 0.5}
    draws = [
        row(
            "random_weights",
            like | {"seed": k},
            0.024,
            asr={"vanilla": v, "no_system": n},
            utility=u,
            asr_second=second | {"asr": {"vanilla": v, "no_system": 1.0}},
        )
        for k, (v, n, u) in enumerate([(0.0, 0.1, 0.9), (0.3, 0.1, 0.8), (0.0, 0.4, 0.85)])
    ]
    rows = [ROWS[0], ROWS[1], draws[0], ROWS[4], draws[1], draws[2], ROWS[6]]
    pooled = pool_draws(rows)
    assert [r["key"] for r in pooled[:2]] == [r["key"] for r in rows[:2]]
    assert pooled[2]["key"] == "random_weights(p=0.05,q=0.05,score=wanda)"  # no seed: all draws
    mean = pooled[2]
    assert mean["params"] == like and mean["draws"] == 3 and mean["removed"] == 0.024
    assert mean["asr"] == pytest.approx({"vanilla": 0.1, "no_system": 0.2})
    assert mean["utility"] == pytest.approx(0.85) and mean["seconds"] == pytest.approx(4.5)
    assert mean["asr_second"]["judge"] == "keyword"
    assert mean["asr_second"]["asr"]["vanilla"] == pytest.approx(0.1)
    assert mean["range"] == {
        "ASR vanilla": [0.0, 0.3],
        "ASR no_system": [0.1, 0.4],
        "utility": [0.8, 0.9],
    }
    assert pooled[4] is ROWS[6]  # one draw, no seed: as it was

    flat = summary_rows(rows)
    assert [f["draws"] for f in flat] == ["", "", 3, "", ""]
    assert flat[2]["ASR range"] == pytest.approx(0.3) and flat[0]["ASR range"] == ""
    assert summary_rows(ROWS[:2])[0].keys() == flat[0].keys() - {"draws", "ASR range"}
    write_report(tmp_path, rows, {})
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and table[2]["draws"] == "3"
    assert float(table[2]["ASR vanilla"]) == pytest.approx(0.1)
    kept = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["params"].get("seed") for r in kept if r["method"] == "random_weights"] == [0, 1, 2]
