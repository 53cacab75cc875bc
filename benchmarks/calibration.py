"""Calibration: pyattr's one streaming pass against the released research code's approach.

    python -m benchmarks.calibration            # ~110M-parameter random Llama (CPU), or a
                                                # 7B-shaped one in bf16 when CUDA is there
    python -m benchmarks.calibration --quick    # a tiny model, a smoke run

Baselines, re-implemented as the released code works (and as issue 4 describes it):
- covariance by stored activations: forward hooks keep every counted input row of every input
  group (fp32, on the CPU), and ``XᵀX`` is formed per group after the pass;
- SNIP by per-layer passes: one pass over the data set per decoder block, forward and backward
  per sample with only that block's weights requiring grad, |grad| summed.
pyattr: ``pyattr.calibrate`` with the same samples, one sample per forward (as the baselines),
plus a batched row for norms and covariance.

Every method runs in a fresh process, so its peak memory is its own: on the CPU the peak
resident set above what the process held after building the model and data (Linux
``clear_refs``/``VmHWM``), on CUDA ``max_memory_allocated`` above the same point. A checksum
(Σ trace C, or Σ|grad|) shows that each baseline computed what pyattr computed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from dataclasses import dataclass

import torch

from benchmarks.common import header, table

FULL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, heads=12, vocab=16000)
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, heads=32)
SEVEN_B["vocab"] = 32000
QUICK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, heads=4, vocab=256)
# Llama-3-8B's widths: grouped-query k/v (8 heads), a 14336-wide MLP, a 128256-token vocabulary.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, heads=32)
LLAMA3_8B |= {"kv_heads": 8, "vocab": 128256}


@dataclass(frozen=True)
class Setup:
    shape: dict
    samples: dict  # task → number of samples
    length: int
    device: str
    dtype: torch.dtype


def build(setup: Setup, samples: int):
    """The random model and the encoded samples (second half of each sample counted)."""
    import transformers

    from pyattr.data import Encoded

    s = setup.shape
    config = transformers.LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s.get("kv_heads", s["heads"]),
        max_position_embeddings=max(2048, setup.length),
    )
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = transformers.LlamaForCausalLM(config).to(setup.dtype).eval()
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(samples):
        ids = torch.randint(0, s["vocab"], (setup.length,), generator=gen)
        counted = torch.arange(setup.length) >= setup.length // 2
        data.append(Encoded(ids, counted))
    return model, data


def random_llama(shape: dict, blocks: int, samples: int, length: int, device: str, dtype):
    """A random Llama of ``shape``'s widths with ``blocks`` decoder blocks, and ``samples``
    encoded samples of ``length`` tokens (the second half counted)."""
    setup = Setup(shape | {"num_hidden_layers": blocks}, {}, length, device, dtype)
    return build(setup, samples)


class _Pad:
    pad_token_id = 0
    eos_token_id = 0


def pyattr_method(model, data, collect: tuple, batch_size: int = 1) -> float:
    import pyattr

    stats = pyattr.calibrate(
        model, _Pad(), data, collect=collect, progress=False, batch_size=batch_size
    )
    if "snip" in collect:
        return sum(float(g.double().sum()) for g in stats.grad_abs.values())
    return sum(float(stats.covariance(name).double().trace()) for name in stats.groups)


def store_inputs(model, data) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every counted input row of every input group, fp32 on the CPU (the released code's
    hooks), keyed by the group's first layer; and layer name → that key."""
    from pyattr.models import find_linear_layers, input_groups

    groups = input_groups(model, find_linear_layers(model))
    stored: dict[str, list[torch.Tensor]] = {g[0].name: [] for g in groups}
    current = {}
    handles = [
        g[0].module.register_forward_pre_hook(
            lambda m, a, name=g[0].name: stored[name].append(
                a[0][0][current["mask"].to(a[0].device)].float().cpu()
            )
        )
        for g in groups
    ]
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        for enc in data:
            current["mask"] = enc.counted
            model(input_ids=enc.input_ids[None].to(device), use_cache=False)
    for h in handles:
        h.remove()
    key = {layer.name: g[0].name for g in groups for layer in g}
    return {name: torch.cat(rows) for name, rows in stored.items()}, key


def stored_activations(model, data) -> float:
    """Keep every counted input row of every group on the CPU, then XᵀX per group."""
    stored, _ = store_inputs(model, data)
    covariances = {name: x.T @ x for name, x in stored.items()}
    return sum(float(c.double().trace()) for c in covariances.values())


def per_block_snip(model, data) -> float:
    """One pass over the data per decoder block, grad only for that block's weights."""
    from pyattr.models import find_linear_layers

    layers = find_linear_layers(model)
    device = model.get_input_embeddings().weight.device
    for p in model.parameters():
        p.requires_grad_(False)
    sums = {}  # kept, like pyattr's result (the released code saved each block's to disk)
    for block in sorted({layer.block for layer in layers}):
        mine = [layer for layer in layers if layer.block == block]
        sums |= {layer.name: torch.zeros_like(layer.weight, dtype=torch.float32) for layer in mine}
        for layer in mine:
            layer.module.weight.requires_grad_(True)
        for enc in data:
            ids = enc.input_ids[None].to(device)
            target = enc.counted[1:].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1][target].float()
            torch.nn.functional.cross_entropy(logits, ids[0, 1:][target]).backward()
            for layer in mine:
                sums[layer.name] += layer.module.weight.grad.abs().float()
                layer.module.weight.grad = None
        for layer in mine:
            layer.module.weight.requires_grad_(False)
    return sum(float(s.double().sum()) for s in sums.values())


METHODS = {
    "norms+covariance": [
        ("stored activations (released code)", lambda m, d: stored_activations(m, d)),
        ("pyattr, one pass", lambda m, d: pyattr_method(m, d, ("norms", "covariance"))),
        ("pyattr, one pass, batch 8", lambda m, d: pyattr_method(m, d, ("covariance",), 8)),
    ],
    "snip": [
        ("per-block passes (released code)", lambda m, d: per_block_snip(m, d)),
        ("pyattr, one pass", lambda m, d: pyattr_method(m, d, ("snip",))),
    ],
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _child(setup: Setup, task: str, index: int, queue) -> None:
    model, data = build(setup, setup.samples[task])
    fn = METHODS[task][index][1]
    cuda = setup.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (VmHWM)
            f.write("5")
        base = _rss_kb("VmRSS:") * 1024
    start = time.perf_counter()
    checksum = fn(model, data)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM:") * 1024
    queue.put((seconds, peak - base, checksum, sum(p.numel() for p in model.parameters())))


class _Queue(list):
    put = list.append


def call(target, args: tuple, name: str, isolate: bool = True):
    """``target(*args, queue)`` in a fresh (spawned) process, or here; its one queued result."""
    if not isolate:
        queue = _Queue()
        target(*args, queue)
        return queue[0]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{name} failed ({proc.exitcode})")
    return result


def run_isolated(
    setup: Setup, task: str, index: int, isolate: bool = True
) -> tuple[float, int, float, int]:
    name = f"{task} / {METHODS[task][index][0]}"
    return call(_child, (setup, task, index), name, isolate)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
    parser.add_argument("--cov-samples", type=int, default=None, help="for norms+covariance")
    parser.add_argument("--snip-samples", type=int, default=None, help="for SNIP")
    parser.add_argument("--length", type=int, default=None, help="tokens per sample")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every method in this process (faster start; peaks less exact)",
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shape, cov, snip, length, dtype = (
        (QUICK, 3, 3, 32, torch.float32)
        if args.quick
        else (SEVEN_B, 128, 16, 512, torch.bfloat16)
        if cuda
        else (FULL, 64, 8, 256, torch.float32)
    )
    samples = {"norms+covariance": args.cov_samples or cov, "snip": args.snip_samples or snip}
    setup = Setup(shape, samples, args.length or length, device, dtype)
    params = 0
    rows = []
    for task, methods in METHODS.items():
        base_time = base_sum = None
        for index, (name, _) in enumerate(methods):
            seconds, peak, checksum, params = run_isolated(setup, task, index, not args.in_process)
            base_time = base_time or seconds
            base_sum = base_sum or checksum
            tokens = setup.samples[task] * (setup.length - setup.length // 2)
            rows.append(
                {
                    "task": task,
                    "samples": setup.samples[task],
                    "method": name,
                    "s": f"{seconds:.2f}",
                    "tok/s": f"{tokens / seconds:.0f}",
                    "speed-up": f"{base_time / seconds:.1f}x",
                    "peak": f"{peak / 2**20:.0f} MiB",
                    "check": f"{abs(checksum - base_sum) / abs(base_sum):.1e}",
                }
            )
            print(f"{task:>17} | {name:<36} {seconds:8.2f} s  peak {peak / 2**20:8.0f} MiB")
    lines = [
        f"## Calibration ({header(device)})",
        "",
        f"Random Llama, {params / 1e6:.0f}M parameters ({setup.shape['num_hidden_layers']} "
        f"layers, hidden {setup.shape['hidden_size']}, {setup.dtype}), samples of "
        f"{setup.length} tokens, the second half counted (tok/s counts counted tokens).",
        "",
        table(
            rows,
            [
                ("task", "task"),
                ("method", "method"),
                ("samples", "samples"),
                ("s", "seconds"),
                ("tok/s", "counted tok/s"),
                ("speed-up", "speed-up"),
                ("peak", "peak extra memory"),
                ("check", "checksum rel. diff"),
            ],
        ),
    ]
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
