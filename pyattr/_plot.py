"""The one place plots are set up and written: matplotlib's headless backend, and PNGs written
atomically (an interrupted run leaves no half-drawn figure)."""

from __future__ import annotations

import io
from pathlib import Path

from .io import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that names the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"plots need matplotlib ({exc}): `pip install 'pyattr[plot]'`") from None
    return plt


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(Path(path), buffer.getvalue())
