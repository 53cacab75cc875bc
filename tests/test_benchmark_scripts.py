"""The benchmark scripts stay runnable: a smoke run at tiny sizes (no timing is asserted)."""

from benchmarks.covariance import main


def test_covariance_benchmark_smoke():
    out = main(["--quick", "--reps", "1"])
    assert "| pyattr |" in out and "rel. error" in out
