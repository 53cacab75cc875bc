"""The toy's training in a child process pinned to one instruction set, so that every x86-64 CPU
with AVX2 trains the same model.

A build's weights depend on the CPU's kernels, not only on the recipe: ATen's vectorised
reductions and softmax (8 floats wide with AVX2, 16 with AVX-512) and, on Intel CPUs, MKL's GEMM
dispatch by instruction set, and alignment amplifies their rounding over its steps. So an
AVX-512 machine used to train another toy than an AVX2 one, a toy on which the tests' bars had
never been measured, and three of them failed there (``benchmarks/RESULTS.md``, "One toy on
every x86-64 CPU"). The libraries choose their kernels once per process, from the environment
(``PIN``), so a build trains in a child process started with it. On an AMD EPYC with AVX-512 the
pinned build reproduced every figure of the demo table measured on an AVX2 machine. On Intel CPUs
MKL's AVX2 kernels are pinned too, but whether they round as those it runs on AMD CPUs is not
measured. A CPU without AVX2 (or not x86) trains with its own kernels, and its cache entry says
which (``manifest.json``, ``cpu_capability``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .recipe import Recipe
from .train import TRAIN_THREADS

# What the child's environment sets: ATen's kernels (``torch.backends.cpu.get_cpu_capability``),
# MKL's and oneDNN's highest instruction set. Not ``MKL_CBWR``: its reproducible branches are
# other kernels, which round otherwise even on an AVX2 CPU.
PIN = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
PINNABLE = ("AVX2", "AVX512")  # ATen's capabilities of the CPUs that can run AVX2's kernels
_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds the pyattr package
_CHILD = f"import sys; sys.path.append({_ROOT!r}); from pyattr.toy.pinned import _child; _child()"


def capability() -> str:
    """The instruction set a build of the toy trains with here: AVX2 wherever the CPU has it
    (pinned), the CPU's own elsewhere (as ATen names it)."""
    native = torch.backends.cpu.get_cpu_capability()
    return "AVX2" if native in PINNABLE else native


def train_pinned(
    recipe: Recipe,
    out: Path,
    *,
    base: Path | None = None,
    threads: int = TRAIN_THREADS,
    tick: Callable[[int], None] | None = None,
) -> dict:
    """Train ``recipe``'s two stages in a child process pinned to ``capability()`` and save its
    tokenizer and models under ``out`` (``tokenizer``, ``base``, ``aligned``); return what the
    weights depend on beyond the recipe (``cpu_capability``, ``train_threads``, ``torch``) and
    ``train_seconds``. ``base``: a folder of stage 1's model trained before (it is skipped);
    ``threads``: as ``train``'s; ``tick(step)`` as steps finish. The child's other output is
    passed on, and a failure raises RuntimeError with its error output's last lines."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    env = dict(os.environ)
    if torch.backends.cpu.get_cpu_capability() in PINNABLE:
        env.update(PIN)
    args = [json.dumps(dataclasses.asdict(recipe)), str(out), str(threads), str(base or "")]
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=20)
    relay = threading.Thread(target=_relay, args=(proc.stderr, tail), daemon=True)
    relay.start()
    about = None
    try:
        for line in proc.stdout:
            kind, _, value = line.rstrip("\n").partition(" ")
            if kind == "step" and tick is not None:
                tick(int(value))
            elif kind == "about":
                about = json.loads(value)
            elif kind != "step":  # anything else the child prints is the caller's to see
                sys.stdout.write(line)
        status = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: the child's work is lost with the build's
            proc.kill()
            proc.wait()
        relay.join(timeout=5)
    if status != 0 or about is None:
        raise RuntimeError(
            f"training the toy model failed in its child process (exit status {status}):\n"
            + "".join(tail)
        )
    return about


def _relay(stream, tail: collections.deque) -> None:
    """Pass the child's error output on to ours, keeping its last lines for an error."""
    for line in stream:
        tail.append(line)
        sys.stderr.write(line)


def _child() -> None:
    """The child's side of ``train_pinned``: argv is the recipe's fields (JSON), the output
    folder, the thread count and the base's folder (or empty). Prints ``step N`` as steps finish
    and ``about {...}`` last."""
    fields, out, threads, base_dir = sys.argv[1:5]
    import transformers

    from .recipe import make_splits
    from .train import train

    transformers.utils.logging.disable_progress_bar()  # the parent shows the build's progress
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(fields).items()}
    recipe = Recipe(**fields)  # JSON's lists are the recipe's tuples
    base = None
    if base_dir:  # eager attention, as a build trains (SDPA rounds otherwise)
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    start = time.perf_counter()
    tok, base, aligned = train(
        recipe,
        make_splits(recipe),
        tick=lambda step: print("step", step, flush=True),
        base=base,
        threads=int(threads),
    )
    seconds = round(time.perf_counter() - start, 1)
    out = Path(out)
    tok.save_pretrained(out / "tokenizer")
    base.save_pretrained(out / "base")
    aligned.save_pretrained(out / "aligned")
    about = {
        "train_seconds": seconds,
        "torch": torch.__version__,
        "train_threads": int(threads),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    print("about", json.dumps(about), flush=True)
