"""Timing and reporting helpers shared by the benchmark scripts and the pytest-benchmark suite."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: torch.device | str, reps: int = 5) -> dict:
    """Median and spread of ``fn``'s wall time in seconds (one warm-up call, synchronised)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], rep=max(100, 40 * reps))
        return {"median": ms[1] / 1e3, "p20": ms[0] / 1e3, "p80": ms[2] / 1e3}
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "median": statistics.median(times),
        "p20": times[int(0.2 * (len(times) - 1))],
        "p80": times[int(0.8 * (len(times) - 1))],
    }


def compare(methods: dict[str, Callable[[], object]], device: str, reps: int = 5) -> dict:
    """Median seconds per method. On the CPU the methods take turns within each repetition, so
    a slow spell of a shared machine hits all of them alike and the ratios stay fair."""
    if torch.device(device).type == "cuda":
        return {name: measure(fn, device, reps)["median"] for name, fn in methods.items()}
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def device_name(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def header(device: torch.device | str) -> str:
    today = datetime.date.today().isoformat()
    return f"{device_name(device)} · torch {torch.__version__} · {today}"


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table from dicts: ``columns`` is [(key, title)]."""
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
