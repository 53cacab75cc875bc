"""Calibration: one streaming pass of a data set through a model, to the statistics that
Wanda, SNIP and ActSVD need (DESIGN.md, "Data flow").

Forward pre-hooks on the first layer of every input group (``models.input_groups``) feed one
``StreamingCovariance`` per group with that layer's input rows, counting only the tokens the
data marks (response tokens by default): n, Σx² (Wanda's norms) and, when asked, Σxxᵀ. SNIP runs
one forward and backward per sample (L_b = mean cross-entropy over the sample's counted target
tokens) and folds |∂L_b/∂W| into an fp32 accumulator as soon as autograd produces each weight's
gradient (post-accumulate-grad hooks), then frees it: peak memory is the model plus the
accumulators, not plus all gradients. No activation is stored and no layer is re-run.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .covariance import CovarianceStats, StreamingCovariance
from .data import Encoded, Example, encode_all
from .layerwise import BlockRunner
from .models import (
    LinearLayer,
    check_finite,
    find_linear_layers,
    input_device,
    input_groups,
    layers_by_name,
    max_length_for,
    pad_id,
)
from .models import pad as pad_rows
from .plan import Budget, Item, Plan, execution_device, items_for, plan_passes
from .stats import Stats

_log = logging.getLogger("pyattr")

__all__ = ["Stats", "calibrate"]

_COLLECT = ("norms", "covariance", "snip", "grad_sum")
# The statistics folded from per-sample gradients: both come out of the same backward passes.
GRADIENT_STATISTICS = ("snip", "grad_sum")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrate", unit="batch", dynamic_ncols=True)


def _say(message: str, progress: bool) -> None:
    """Tell the user what calibration chose: on stderr next to the progress bar, and the log."""
    _log.info(message)
    if progress:
        print(f"pyattr.calibrate: {message}", file=sys.stderr, flush=True)


def _examples(examples) -> list:
    """The calibration set as a list of ``Example`` or ``Encoded``; a path is read with
    ``load_pairs``. Anything else is refused before any work, naming what is accepted."""
    if isinstance(examples, (str, Path)):
        from .data import load_pairs

        return load_pairs(examples)
    if isinstance(examples, (bytes, Mapping)) or not isinstance(examples, Iterable):
        raise TypeError(
            "examples must be a path to a pairs file, or a sequence of pyattr.data.Example or "
            f"Encoded; got {type(examples).__name__}"
        )
    examples = list(examples)
    if not examples:
        raise ValueError("the calibration set is empty")
    odd = next((e for e in examples if not isinstance(e, (Example, Encoded))), None)
    if odd is not None:
        raise TypeError(
            "examples must be pyattr.data.Example pairs or Encoded sequences (or a path to a "
            f"pairs file); got an item of type {type(odd).__name__}: {odd!r:.60}"
        )
    return examples


def calibrate(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example] | Sequence[Encoded] | str | Path,
    *,
    collect: Iterable[str] = ("norms",),
    layers: Sequence[LinearLayer] | None = None,
    count: str = "response",
    system_prompt: str | None = None,
    max_length: int | None = None,
    eos: bool = True,
    accumulate_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    distributed: bool | None = None,
    batch_size: int = 1,
    max_memory: Budget = None,
    layerwise: bool = False,
    device: str | torch.device | None = None,
    after_block: Callable[[int, Stats], None] | None = None,
) -> Stats:
    """Statistics of ``examples`` for every linear layer: ``Example`` pairs, already encoded
    sequences, or a file or saved data set that ``data.load_pairs`` reads (its default
    ``prompt``/``response`` columns; call ``load_pairs`` yourself for others).

    collect: any of "norms" (n and Σx², always kept), "covariance" (Σxxᵀ per input group),
    "snip" (Σ|∂L_b/∂W|, one backward per sample), "grad_sum" (Σ ∂L_b/∂W, signed, from the same
    backward passes). layers: defaults to every linear layer in the
    decoder blocks. max_length: defaults to the model's context length. eos: count the EOS
    token after each response (False: the released code's statistics, response tokens only).
    distributed: with torch.distributed initialised (``None`` uses it when it is), each rank
    calibrates ``examples[rank::world_size]`` and one all-reduce sums the statistics, so every
    rank returns what a single process would have counted (up to floating-point summation
    order; choose ``accumulate_dtype=torch.float64`` where that matters).
    batch_size: samples per forward for norms and covariance (right-padded, grouped by length;
    padding is never counted). SNIP always runs one sample per backward, as defined.
    max_memory: budget for the statistics held at once (bytes, ``"20GB"``, or ``{device:
    size}``; default 80% of each CUDA device's free memory, no limit on the CPU). When they do
    not fit, the layers are split into several passes over the data (``pyattr.plan``) and the
    choice is printed; statistics finished in one pass wait on the CPU.
    layerwise: run the decoder blocks one at a time on ``device`` (default: CUDA when
    available), the calibration set's hidden states cached there and every other block left
    where it is: for models larger than the accelerator. Norms and covariance only; for SNIP
    across several GPUs load the model with accelerate's ``device_map`` instead (every weight
    must be resident on some device; offloaded weights are an error).
    after_block: with layerwise, ``after_block(block, stats)`` is called once each block's
    statistics are complete (``stats`` holds that block's layers only) and before its outputs
    go on to the next block, so an edit it makes to the block shapes every later block's
    statistics: the released code's sequential pruning (``pyattr.sequential``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    collect = tuple(collect)
    unknown = [c for c in collect if c not in _COLLECT]
    if unknown:
        raise ValueError(f"collect must be among {_COLLECT}, got {unknown}")
    snip = any(c in collect for c in GRADIENT_STATISTICS)
    if after_block is not None and not layerwise:
        raise ValueError("after_block needs layerwise=True (the blocks run one at a time)")
    if layerwise and snip:
        raise ValueError(
            "SNIP needs a backward pass through the whole model, which layerwise mode does not "
            "hold: collect it without layerwise=True, spreading the model over GPUs with "
            "accelerate's device_map if it does not fit on one"
        )
    examples = _examples(examples)
    import torch.distributed as dist

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if after_block is not None and world > 1:
        raise ValueError("after_block edits from one process's statistics: not distributed")
    layers = list(layers) if layers is not None else find_linear_layers(model)
    _check_resident(layers, snip)
    exec_device = execution_device(device) if layerwise else None
    max_length = max_length_for(model, max_length)
    check_finite(model)  # NaN weights would give NaN statistics, written without complaint
    encoded = (
        list(examples)
        if isinstance(examples[0], Encoded)
        else encode_all(
            tokenizer,
            examples,
            max_length=max_length,
            count=count,
            system_prompt=system_prompt,
            eos=eos,
        )
    )[rank::world]
    if world == 1 and not any(bool(e.counted.any()) for e in encoded):
        raise ValueError(
            f"no token is counted in any of the {len(encoded)} examples: each is cut before "
            f"its response (max_length={max_length}) or counts nothing (count={count!r})"
        )
    groups = input_groups(model, layers)
    plan = plan_passes(
        items_for(groups, layers, collect, accumulate_dtype, exec_device),
        max_memory,
        layerwise=layerwise,
    )
    if layerwise or len(plan.passes) > 1:
        _say(plan.describe(), progress and rank == 0)
    layer_group = {layer.name: group[0].name for group in groups for layer in group}
    pad = pad_id(tokenizer, fallback=0)  # padding is never attended to nor counted
    batches = [_collate(b, pad) for b in _batches(encoded, 1 if snip else batch_size)]
    run = _Run(model, groups, layers, collect, accumulate_dtype, exec_device, batches)
    samples = len(encoded)
    tokens = sum(int(e.counted.sum()) for e in encoded)

    def stats_of(keys: Sequence[str]) -> Stats:
        """The statistics of the input groups ``keys`` (one block's), as a ``Stats``."""
        names = [layer.name for key in keys for layer in run.groups[key]]
        return Stats(
            groups={k: run.results[k] for k in keys},
            layer_group={n: layer_group[n] for n in names},
            shapes={n: (run.layers[n].d_out, run.layers[n].d_in) for n in names},
            grad_abs={},
            grad_sum={},
            samples=samples,
            tokens=tokens,
            architecture=type(model).__name__,
        )

    if after_block is not None:
        run.after_block = lambda block, keys: after_block(block, stats_of(keys))
    bar = _progress(len(batches) * len(plan.passes), progress and rank == 0)
    was_training = model.training
    model.eval()
    try:
        if layerwise:
            run.layerwise(plan, bar)
        else:
            for items in plan.passes:
                run.one_pass(items, bar, offload=len(plan.passes) > 1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    results, grads = run.results, run.grads
    if distributed:
        results, samples, tokens = _all_reduce(results, grads, samples, tokens)
    return Stats(
        groups={g[0].name: results[g[0].name] for g in groups},
        layer_group=layer_group,
        shapes={layer.name: (layer.d_out, layer.d_in) for layer in layers},
        grad_abs={n: g for n, g in grads["snip"].items() if n in layer_group},
        grad_sum={n: g for n, g in grads["grad_sum"].items() if n in layer_group},
        samples=samples,
        tokens=tokens,
        architecture=type(model).__name__,
    )


def _check_resident(layers: Sequence[LinearLayer], snip: bool) -> None:
    """Offloaded weights (accelerate's meta placeholders) cannot carry gradients to fold."""
    if not snip:
        return
    for layer in layers:
        if layer.module.weight.device.type == "meta":
            raise ValueError(
                f"{layer.name}'s weight is offloaded (on the meta device): SNIP needs every "
                "weight resident on some device; give the device_map more GPU memory, or use "
                "layerwise=True for norms and covariance"
            )


class _Run:
    """The accumulators of one calibration and the passes that fill them."""

    def __init__(self, model, groups, layers, collect, accumulate_dtype, exec_device, batches):
        self.model = model
        self.groups = {g[0].name: g for g in groups}
        self.layers = layers_by_name(model, layers)
        self.collect = collect
        self.accumulate_dtype = accumulate_dtype
        self.exec_device = exec_device
        self.batches = batches
        self.results: dict[str, CovarianceStats] = {}
        # statistic ("snip" or "grad_sum") → layer name → accumulated gradients
        self.grads: dict[str, dict[str, torch.Tensor]] = {k: {} for k in GRADIENT_STATISTICS}
        self.current: dict[str, torch.Tensor] = {}
        self.tokens_run = 0
        self.start = time.perf_counter()
        # layerwise: called with (block, its group keys) once its statistics are complete,
        # before its outputs move on (a sequential edit changes the block first)
        self.after_block: Callable[[int, list[str]], None] | None = None

    def _accumulators(self, items: Sequence[Item]) -> tuple[dict, list]:
        """StreamingCovariance per group of ``items``, fed by forward pre-hooks."""
        accs, handles = {}, []
        for item in (i for i in items if i.kind == "group"):
            first = self.groups[item.key][0]
            acc = StreamingCovariance(
                first.d_in,
                accumulate_dtype=self.accumulate_dtype,
                buffer_rows=0,
                diagonal_only="covariance" not in self.collect,
                device=torch.device(item.device),
                name=item.key,
            )
            accs[item.key] = acc

            def hook(_module, args, acc=acc):
                x = args[0]
                # Some models flatten (batch, seq) before a layer (OPT's MLP): follow x's shape.
                acc.update(x, self.current["mask"].to(x.device).reshape(x.shape[:-1]))

            handles.append(first.module.register_forward_pre_hook(hook))
        return accs, handles

    def _finish(self, accs: dict[str, StreamingCovariance], offload: bool) -> None:
        for key, acc in accs.items():
            res = acc.result(copy=False)
            if offload and res.sum_sq.device.type != "cpu":
                res = CovarianceStats(
                    n=res.n,
                    sum_sq=res.sum_sq.cpu(),
                    covariance=None if res.covariance is None else res.covariance.cpu(),
                )
            self.results[key] = res

    def _tick(self, bar, counted: torch.Tensor) -> None:
        self.tokens_run += int(counted.sum())
        if bar is not None:
            bar.update(1)
            rate = self.tokens_run / max(time.perf_counter() - self.start, 1e-9)
            bar.set_postfix(tokens_per_s=f"{rate:.0f}")

    def one_pass(self, items: Sequence[Item], bar, *, offload: bool) -> None:
        """Every batch through the whole model, filling the accumulators of ``items``."""
        accs, handles = self._accumulators(items)
        snip_layers = [self.layers[i.key] for i in items if i.kind == "snip"]
        saved_requires_grad: dict = {}
        if snip_layers:
            wanted = {k: v for k, v in self.grads.items() if k in self.collect}
            handles += _snip_hooks(self.model, snip_layers, wanted, saved_requires_grad)
        device = input_device(self.model)
        try:
            for ids, attention, counted in self.batches:
                self.current["mask"] = counted
                if snip_layers:
                    _snip_step(self.model, ids.to(device), counted[0].to(device))
                else:
                    with torch.no_grad():
                        self.model(
                            input_ids=ids.to(device),
                            attention_mask=attention.to(device),
                            use_cache=False,
                        )
                self._tick(bar, counted)
        finally:
            for handle in handles:
                handle.remove()
            for param, flag in saved_requires_grad.items():
                param.requires_grad_(flag)
        if offload:
            for sums in self.grads.values():
                for layer in snip_layers:
                    if layer.name in sums:
                        sums[layer.name] = sums[layer.name].cpu()
        self._finish(accs, offload)

    def layerwise(self, plan: Plan, bar) -> None:
        """Block by block (``pyattr.layerwise``); a block whose statistics are split over
        several passes is re-run over the cached inputs, and advances after its last."""
        runner = BlockRunner(self.model, [(i, a) for i, a, _ in self.batches], self.exec_device)
        last_pass_of = {}
        for number, items in enumerate(plan.passes):
            last_pass_of[items[0].block] = number
        done = -1
        for number, items in enumerate(plan.passes):
            block = items[0].block
            for skipped in range(done + 1, block):  # blocks with no layer asked for
                runner.run(skipped, lambda b: None, advance=True)
            done = block
            accs, handles = self._accumulators(items)

            def before(b: int) -> None:
                self.current["mask"] = self.batches[b][2]
                if b:
                    self._tick(bar, self.batches[b - 1][2])

            last = last_pass_of[block] == number
            edit = last and self.after_block is not None
            try:
                runner.run(block, before, advance=last and not edit)
                self._tick(bar, self.batches[-1][2])
            finally:
                for handle in handles:
                    handle.remove()
            self._finish(accs, offload=True)
            if edit:
                keys = [i.key for p in plan.passes if p[0].block == block for i in p]
                self.after_block(block, [k for k in keys if k in self.groups])
                runner.run(block, lambda b: None, advance=True)  # the edited block's outputs


def _all_reduce(results, grads, samples, tokens):
    """Sum every rank's statistics (they are plain sums) with torch.distributed. NCCL reduces
    CUDA tensors only: statistics that wait on the CPU (several passes, layerwise mode) go
    through the GPU and come back."""
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"

    def reduce_(t: torch.Tensor) -> None:
        if nccl and t.device.type != "cuda":
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t)

    merged = {}
    for key, res in results.items():
        counts = torch.tensor([res.n], dtype=torch.float64)
        reduce_(counts)
        reduce_(res.sum_sq)
        if res.covariance is not None:
            reduce_(res.covariance)
        merged[key] = CovarianceStats(
            n=int(counts.item()), sum_sq=res.sum_sq, covariance=res.covariance
        )
    for sums in grads.values():
        for g in sums.values():
            reduce_(g)
    totals = torch.tensor([samples, tokens], dtype=torch.float64)
    reduce_(totals)
    return merged, int(totals[0].item()), int(totals[1].item())


def _batches(encoded: list[Encoded], size: int):
    """Batches of ``size``, longest first when batching (less padding; sums ignore order)."""
    if size > 1:
        encoded = sorted(encoded, key=lambda e: -len(e.input_ids))
    for i in range(0, len(encoded), size):
        yield encoded[i : i + size]


def _collate(batch: list[Encoded], pad: int):
    """Right-padded (B, L) ids, attention mask and counted-token mask (False on padding)."""
    ids, attention = pad_rows([e.input_ids for e in batch], pad)
    counted, _ = pad_rows([e.counted for e in batch], False, dtype=torch.bool)
    return ids, attention, counted


def _snip_hooks(model, layers, sums, saved_requires_grad):
    """Gradients only for the layers' weights; each folded into the sums asked for (``sums``:
    "snip" → Σ|grad|, "grad_sum" → Σ grad, each a dict by layer name), then freed."""
    wanted = {id(layer.module.weight) for layer in layers}
    for param in model.parameters():
        saved_requires_grad[param] = param.requires_grad
        param.requires_grad_(id(param) in wanted)
    handles = []
    for layer in layers:
        weight = layer.module.weight
        for acc in sums.values():
            acc[layer.name] = torch.zeros(
                layer.d_out, layer.d_in, dtype=torch.float32, device=weight.device
            )

        def fold(param, name=layer.name, layer=layer):
            g = layer.relayout(param.grad)
            if "snip" in sums:
                sums["snip"][name] += g.abs().to(torch.float32)
            if "grad_sum" in sums:
                sums["grad_sum"][name] += g.to(torch.float32)
            param.grad = None

        handles.append(weight.register_post_accumulate_grad_hook(fold))
    return handles


def _snip_step(model, ids: torch.Tensor, counted: torch.Tensor) -> None:
    """One sample: L_b = mean cross-entropy over its counted target tokens; backward."""
    targets = counted[1:]
    if not bool(targets.any()):
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        return
    with torch.enable_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1][targets]
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()  # the loss in at least fp32; never lower a model's precision
        loss = nn.functional.cross_entropy(logits, ids[0, 1:][targets])
        loss.backward()
