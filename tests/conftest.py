"""Shared test setup: the interpreter for Triton on CPU, the CUDA marker, and seeded generators.

Every run draws fresh random data; the run's base seed is printed in pytest's header and can be
replayed with ``PYATTR_TEST_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    # Must happen before any Triton kernel is imported: kernels then run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_SEED = int(os.environ.get("PYATTR_TEST_SEED", random.SystemRandom().randrange(2**31)))

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.requires_cuda),
]


def pytest_report_header(config: pytest.Config) -> str:
    return f"pyattr test seed: {_SEED} (replay with PYATTR_TEST_SEED={_SEED})"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    # Also under -q (which hides the header): a failure can always be replayed.
    terminalreporter.write_line(f"pyattr test seed: {_SEED} (PYATTR_TEST_SEED={_SEED})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="requires_cuda: no CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed unique to this test and this run."""
    return (_SEED ^ zlib.crc32(request.node.nodeid.encode())) % 2**31


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded for this test (draw on CPU, then move to the device)."""
    return torch.Generator().manual_seed(seed)
