"""The benchmark scripts stay runnable: a smoke run at tiny sizes (no timing is asserted)."""

from benchmarks import covariance, selection


def test_covariance_benchmark_smoke():
    out = covariance.main(["--quick", "--reps", "1"])
    assert "| pyattr |" in out and "rel. error" in out


def test_selection_benchmark_smoke():
    out = selection.main(["--quick", "--reps", "1"])
    assert "set difference" in out and "% copy" in out


def test_calibration_benchmark_smoke():
    from benchmarks import calibration

    out = calibration.main(["--quick", "--in-process"])
    assert "per-block passes (released code)" in out and "peak extra memory" in out


def test_generation_benchmark_smoke():
    from benchmarks import generation

    out = generation.main(["--quick"])
    assert "one prompt at a time" in out and "same texts: yes" in out


def test_toy_asr_smoke():
    from benchmarks import toy_asr

    out = toy_asr.main(["--quick"])
    assert "adv_decoding (mean)" in out and "Wanda set difference" in out


def test_lowrank_benchmark_smoke():
    from benchmarks import lowrank

    out = lowrank.main(["--quick", "--in-process"])
    assert "svd_lowrank per setting (released code)" in out and "eigenbases once" in out


def test_toy_rank_smoke(tmp_path):
    from benchmarks import toy_rank

    out = toy_rank.main(["--quick", "--out", str(tmp_path)])
    assert "random directions, same ranks" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "toy_jaccard.csv",
        "toy_jaccard.png",
        "toy_subspace.csv",
        "toy_subspace.png",
    ]
