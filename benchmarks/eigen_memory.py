"""Host memory of the eigenbases of a 7B-shaped model: all in memory against streamed to disk.

    python -m benchmarks.eigen_memory                  # 2 blocks of Llama-2-7B's shapes, fp64
    python -m benchmarks.eigen_memory --blocks 1 --dtype float32

Each mode runs in its own process: a random Llama with Llama-2-7B's block shapes (hidden 4096,
MLP 11008, 32 heads; a small vocabulary), statistics of 8 random sequences of 64 tokens, then
the eigenbases of every linear layer, in memory (``pyattr.eigenbases``), streamed with the
in-memory routes, or streamed with the lean route (``pyattr.eigenstore.stream_eigenbases``'s
default). The figure is the peak resident memory during that
step above the resident memory when it starts (model and statistics already there), sampled
every 5 ms from /proc/self/statm, beside the size of the largest single layer's basis (gate/up:
11008 × 4096).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.common import header, table

SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32}
MODES = {
    "memory": "in memory (`pyattr.eigenbases`)",
    "streamed": "streamed, route auto (`stream_eigenbases(route='auto')`)",
    "lean": "streamed, lean route (`stream_eigenbases`, the default)",
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(mode: str, blocks: int, dtype: str, folder: str) -> dict:
    import torch
    import transformers

    import pyattr
    from pyattr.data import Encoded
    from pyattr.eigenstore import stream_eigenbases

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, num_hidden_layers=blocks, max_position_embeddings=128, **SHAPE
    )
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    data = [
        Encoded(torch.randint(0, 256, (64,), generator=gen), torch.ones(64, dtype=torch.bool))
        for _ in range(8)
    ]
    stats = pyattr.calibrate(model, None, data, collect=("covariance",), progress=False)
    kind = getattr(torch, dtype)
    start, peak, running = _rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    if mode == "memory":
        kept = pyattr.eigenbases(model, stats, dtype=kind, progress=False)
    else:  # "streamed": the in-memory routes one layer at a time; "lean": the lean route
        route = "lean" if mode == "lean" else "auto"
        kept = stream_eigenbases(model, stats, folder, dtype=kind, route=route, progress=False)
    seconds = time.perf_counter() - t0
    running[0] = False
    thread.join()
    peak[0] = max(peak[0], _rss())
    layers = len(kept)
    return {"peak_above_start": peak[0] - start, "seconds": seconds, "layers": layers}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES), help="which to run"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(_child(args.child, args.blocks, args.dtype, folder)))
        return ""
    width = 8 if args.dtype == "float64" else 4
    one_layer = 11008 * 4096 * width  # gate/up: d_out × R
    per_block = (4 * 4096 * 4096 + 3 * 11008 * 4096) * width  # q, k, v, o, down: 4096²
    rows = []
    for mode in args.modes:
        command = [sys.executable, "-m", "benchmarks.eigen_memory", "--child", mode]
        command += ["--blocks", str(args.blocks), "--dtype", args.dtype]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append(
            {
                "mode": MODES[mode],
                "peak": f"{result['peak_above_start'] / 2**20:,.0f} MiB",
                "ratio": f"{result['peak_above_start'] / one_layer:.2f}",
                "s": f"{result['seconds']:.1f}",
                "layers": result["layers"],
            }
        )
    out = "\n".join(
        [
            f"# eigenbases: host memory, in memory vs streamed · {header('cpu')}",
            f"{args.blocks} blocks of Llama-2-7B's shapes, {args.dtype}; the largest layer's "
            f"basis: {one_layer / 2**20:,.0f} MiB; all bases of one block: "
            f"{per_block / 2**20:,.0f} MiB",
            "",
            table(
                rows,
                [
                    ("mode", "eigenbases"),
                    ("layers", "layers"),
                    ("peak", "peak RSS above the start"),
                    ("ratio", "× one layer's basis"),
                    ("s", "seconds"),
                ],
            ),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
