"""Selection ops (Wanda/SNIP per row, N:M, per matrix, set difference) against the one
reference in pyattr.kernels, through the public API on both backends: the Triton kernels (in the
interpreter on a CPU-only machine, natively on CUDA) and the PyTorch path. Masks must be equal
bit for bit; the tests also check counts and that every kept score beats every dropped one."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from pyattr.kernels.matrix_topk import matrix_topk_ref
from pyattr.kernels.nm import nm_ref
from pyattr.kernels.row_topk import row_topk_ref
from pyattr.kernels.scores import scores_ref, wanda_norms
from pyattr.kernels.set_difference import set_difference_ref

import pyattr
from pyattr import ops
from pyattr.ops.selection import pack_bits
from pyattr.selection import SetDifference, count_for

SHAPES = [(5, 123), (17, 45), (3, 1), (33, 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["triton", "torch"])
def backend(request: pytest.FixtureRequest):
    with ops.force_backend(request.param):
        yield request.param


def make(gen, shape, dtype, snip, device="cpu", ties=False):
    """A weight and its statistics; ``ties`` makes whole rows and columns score alike."""
    w = torch.randn(shape, generator=gen)
    if ties:
        w[0] = 0.75
        w[:, : shape[1] // 2] = -0.5
    if snip:
        stats = torch.rand(shape, generator=gen) * 3
        if ties:
            stats[:, :] = 2.0
    else:
        stats = torch.rand(shape[1], generator=gen) * 4
        if ties:
            stats[:] = 1.0
    return w.to(dtype).to(device), stats.to(device)


def ref_scores(w, stats):
    if stats.dim() == 1:
        return scores_ref(w, norms=wanda_norms(stats))
    return scores_ref(w, grad_abs=stats)


def assert_selection_valid(mask, scores, k, largest, per_row=True):
    """Counts are exact and no dropped score beats a kept one."""
    rows = [(mask[i], scores[i]) for i in range(mask.shape[0])] if per_row else [(mask, scores)]
    for m, s in rows:
        assert int(m.sum()) == k
        if 0 < k < m.numel():
            kept, dropped = s[m], s[~m]
            if largest:
                assert kept.min() >= dropped.max()
            else:
                assert kept.max() <= dropped.min()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("snip", [False, True], ids=["wanda", "snip"])
@pytest.mark.parametrize("largest", [True, False], ids=["top", "bottom"])
def test_row_selection(backend, shape, dtype, snip, largest, gen):
    w, stats = make(gen, shape, dtype, snip, ties=bool(torch.rand(1, generator=gen) < 0.5))
    scores = ref_scores(w, stats)
    op = pyattr.snip_mask if snip else pyattr.wanda_mask
    for fraction in (0.0, 1 / shape[1], 0.5, 1.0):
        k = count_for(fraction, shape[1])
        mask = op(w, stats, fraction=fraction, largest=largest)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert torch.equal(mask, row_topk_ref(scores, k, largest=largest)), fraction
        assert_selection_valid(mask, scores, k, largest)


@pytest.mark.parametrize("shape", [(6, 37), (4, 16)], ids=str)
@pytest.mark.parametrize("snip", [False, True], ids=["wanda", "snip"])
def test_row_selection_outputs(backend, shape, snip, gen):
    w, stats = make(gen, shape, torch.bfloat16, snip, ties=True)
    ref = row_topk_ref(ref_scores(w, stats), count_for(0.4, shape[1]))
    op = pyattr.snip_mask if snip else pyattr.wanda_mask
    packed = op(w, stats, fraction=0.4, output="packed")
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] + 7) // 8)
    assert torch.equal(packed, pack_bits(ref))
    target = w.clone()
    out = op(target, stats, fraction=0.4, output="zero")
    assert out.data_ptr() == target.data_ptr() and out.dtype == torch.bfloat16
    assert torch.equal(target, w.masked_fill(ref, 0))


def test_rows_of_ties_pick_lowest_columns(backend):
    w = torch.ones(3, 10)
    mask = pyattr.wanda_mask(w, torch.ones(10), fraction=0.3)
    assert torch.equal(mask, torch.tensor([[True] * 3 + [False] * 7] * 3))
    mask = pyattr.wanda_mask(w, torch.ones(10), fraction=0.3, largest=False)
    assert torch.equal(mask, torch.tensor([[True] * 3 + [False] * 7] * 3))


@pytest.mark.parametrize("shape", [(5, 120), (3, 8), (7, 40)], ids=str)
@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("snip", [False, True], ids=["wanda", "snip"])
def test_nm_selection(backend, shape, m, snip, gen):
    dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=gen))]
    w, stats = make(gen, shape, dtype, snip, ties=True)
    scores = ref_scores(w, stats)
    for n in sorted({0, 1, m // 2, m}):
        for largest in (True, False):
            mask = pyattr.nm_mask(w, stats, n=n, m=m, largest=largest)
            assert torch.equal(mask, nm_ref(scores, n, m, largest=largest)), (n, largest)
            assert torch.equal(
                mask.view(shape[0], -1, m).sum(2),
                torch.full_like(mask.view(shape[0], -1, m).sum(2), n),
            )
    packed = pyattr.nm_mask(w, stats, n=2, m=m, largest=False, output="packed")
    assert torch.equal(packed, pack_bits(nm_ref(scores, 2, m, largest=False)))


@pytest.mark.parametrize("shape", [(5, 45), (3, 1), (9, 20), (2, 130)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("snip", [False, True], ids=["wanda", "snip"])
def test_matrix_selection(backend, shape, dtype, snip, gen):
    w, stats = make(gen, shape, dtype, snip, ties=bool(torch.rand(1, generator=gen) < 0.5))
    scores = ref_scores(w, stats)
    numel = w.numel()
    for fraction in (0.0, 1 / numel, 0.5, 1.0):
        for largest in (True, False):
            k = count_for(fraction, numel)
            mask = pyattr.matrix_topk_mask(w, stats, fraction=fraction, largest=largest)
            assert torch.equal(mask, matrix_topk_ref(scores, k, largest=largest)), fraction
            assert_selection_valid(mask, scores, k, largest, per_row=False)
    via_granularity = (pyattr.snip_mask if snip else pyattr.wanda_mask)(
        w, stats, fraction=0.3, granularity="matrix", output="packed"
    )
    assert torch.equal(via_granularity, pack_bits(matrix_topk_ref(scores, count_for(0.3, numel))))


@pytest.mark.parametrize("shape", [(5, 45), (3, 1), (8, 33)], ids=str)
@pytest.mark.parametrize("snip", [False, True], ids=["wanda", "snip"])
@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_set_difference(backend, shape, snip, granularity, gen):
    dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=gen))]
    w, safety = make(gen, shape, dtype, snip, ties=True)
    _, utility = make(gen, shape, dtype, snip)
    sq, sp = ref_scores(w, safety), ref_scores(w, utility)
    per_row = granularity == "row"
    n = shape[1] if per_row else w.numel()
    for q, p in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.3), (1.0, 1.0), (0.1, 0.9)]:
        mask, counts = pyattr.set_difference_mask(
            w, safety, utility, q=q, p=p, granularity=granularity
        )
        kq, kp = count_for(q, n), count_for(p, n)
        ref, ref_inter = set_difference_ref(sq, sp, kq, kp, per_row=per_row)
        assert torch.equal(mask, ref), (q, p)
        rows = shape[0] if per_row else 1
        assert counts == SetDifference(size_q=kq * rows, size_p=kp * rows, intersection=ref_inter)
        assert counts.size == int(mask.sum())
        union = counts.size_p + counts.size_q - counts.intersection
        assert counts.jaccard == (counts.intersection / union if union else 1.0)
    target = w.clone()
    pyattr.set_difference_mask(
        target, safety, utility, q=0.5, p=0.2, granularity=granularity, output="zero"
    )
    ref, _ = set_difference_ref(sq, sp, count_for(0.5, n), count_for(0.2, n), per_row=per_row)
    assert torch.equal(target, w.masked_fill(ref, 0))


def test_count_for():
    assert count_for(0.29, 100) == 29
    assert count_for(0.5, 45) == 22
    assert count_for(1.0, 7) == 7 and count_for(0.0, 7) == 0
    assert count_for(1 / 123, 123) == 1


@pytest.mark.parametrize("output", ["bool", "zero"])
@pytest.mark.parametrize("matrix_select", ["radix", "twopass"])
def test_nan_statistics_raise_before_writing(backend, output, matrix_select, monkeypatch, gen):
    monkeypatch.setenv("PYATTR_MATRIX_SELECT", matrix_select)
    w, norms = make(gen, (6, 20), torch.float32, snip=False)
    norms[4] = float("nan")
    target = w.clone()
    with pytest.raises(ValueError, match="sq_norms has 1 NaN"):
        pyattr.wanda_mask(target, norms, fraction=0.5, output=output)
    _, grads = make(gen, (6, 20), torch.float32, snip=True)
    grads[2, 3] = float("nan")
    for granularity in ("row", "matrix"):
        with pytest.raises(ValueError, match="NaN or negative"):
            pyattr.snip_mask(target, grads, fraction=0.5, output=output, granularity=granularity)
    with pytest.raises(ValueError, match="NaN or negative"):
        pyattr.nm_mask(target, grads, n=2, m=4, output=output)
    with pytest.raises(ValueError, match="NaN or negative"):
        pyattr.set_difference_mask(target, grads, grads.nan_to_num(), q=0.5, p=0.1, output=output)
    assert torch.equal(target, w)


def test_bad_arguments():
    w, s = torch.randn(4, 8), torch.rand(8)
    cases = [
        (
            ValueError,
            r"fraction must be in \[0, 1\], got 1.5",
            lambda: pyattr.wanda_mask(w, s, fraction=1.5),
        ),
        (
            ValueError,
            r"fraction must be in \[0, 1\], got -0.1",
            lambda: pyattr.wanda_mask(w, s, fraction=-0.1),
        ),
        (
            ValueError,
            r"fraction must be in \[0, 1\], got nan",
            lambda: pyattr.wanda_mask(w, s, fraction=float("nan")),
        ),
        (TypeError, "fraction must be a number", lambda: pyattr.wanda_mask(w, s, fraction=True)),
        (
            ValueError,
            r"q must be in \[0, 1\], got 2",
            lambda: pyattr.set_difference_mask(w, s, s, q=2, p=0.1),
        ),
        (
            ValueError,
            r"Wanda norms must have d_in=8 entries, got \(7,\)",
            lambda: pyattr.wanda_mask(w, s[:7], fraction=0.5),
        ),
        (
            ValueError,
            r"weight's shape \(4, 8\), got \(8, 4\)",
            lambda: pyattr.snip_mask(w, torch.rand(8, 4), fraction=0.5),
        ),
        (
            ValueError,
            r"2-D \(d_out, d_in\), got shape \(8,\)",
            lambda: pyattr.wanda_mask(s, s, fraction=0.5),
        ),
        (
            TypeError,
            "bf16, fp16 or fp32, got torch.int64",
            lambda: pyattr.wanda_mask(w.long(), s, fraction=0.5),
        ),
        (
            TypeError,
            "sq_norms must be floating point",
            lambda: pyattr.wanda_mask(w, s.long(), fraction=0.5),
        ),
        (
            ValueError,
            "sq_norms is on meta but weight is on cpu",
            lambda: pyattr.wanda_mask(w, s.to("meta"), fraction=0.5),
        ),
        (ValueError, "negative", lambda: pyattr.wanda_mask(w, -s, fraction=0.5)),
        (ValueError, "Inf", lambda: pyattr.wanda_mask(w, s / 0, fraction=0.5)),
        (ValueError, "output must be", lambda: pyattr.wanda_mask(w, s, fraction=0.5, output="x")),
        (
            ValueError,
            "granularity must be",
            lambda: pyattr.wanda_mask(w, s, fraction=0.5, granularity="col"),
        ),
        (ValueError, "m must be a power of two", lambda: pyattr.nm_mask(w, s, n=2, m=3)),
        (ValueError, r"n must be an int in \[0, m=4\]", lambda: pyattr.nm_mask(w, s, n=5, m=4)),
        (
            ValueError,
            "not a multiple of m=8",
            lambda: pyattr.nm_mask(torch.randn(4, 12), torch.rand(12), n=2, m=8),
        ),
        (
            ValueError,
            "both be Wanda norms or both SNIP",
            lambda: pyattr.set_difference_mask(w, s, torch.rand(4, 8), q=0.5, p=0.5),
        ),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008), (311, 28672)], ids=str)
def test_cuda_full_size_matches_torch_path(shape, gen):
    """Full Llama widths on the GPU: the Triton kernels equal the PyTorch path bit for bit."""
    w, norms = make(gen, shape, torch.bfloat16, snip=False, device="cuda")
    _, other = make(gen, shape, torch.bfloat16, snip=False, device="cuda")
    for granularity in ("row", "matrix"):
        got = pyattr.wanda_mask(w, norms, fraction=0.03, granularity=granularity)
        want_sd = pyattr.set_difference_mask(
            w, norms, other, q=0.03, p=0.03, granularity=granularity
        )
        with ops.force_backend("torch"):
            assert torch.equal(
                got, pyattr.wanda_mask(w, norms, fraction=0.03, granularity=granularity)
            )
            ref_sd = pyattr.set_difference_mask(
                w, norms, other, q=0.03, p=0.03, granularity=granularity
            )
        assert torch.equal(want_sd[0], ref_sd[0]) and want_sd[1] == ref_sd[1]
    got = pyattr.nm_mask(w, norms, n=2, m=4, largest=False)
    with ops.force_backend("torch"):
        assert torch.equal(got, pyattr.nm_mask(w, norms, n=2, m=4, largest=False))


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_reports_backends(device):
    backends = ops.backends()
    assert "selection[cpu]" in backends and "selection[cuda]" in backends
    w = torch.randn(3, 4, device=device)
    expected = "triton" if device == "cuda" else "torch"
    assert ops.selection_backend(w, per_row=True) == expected


def test_negative_zero_statistics_score_as_zero(backend):
    """-0.0 passes the >= 0 check; every path must rank it exactly like +0.0."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([-0.0, 0.0, -0.0, 1.0])
    mask = pyattr.wanda_mask(w, norms, fraction=0.5)
    assert torch.equal(mask, torch.tensor([[True, False, False, True]]))
    grads = torch.tensor([[0.0, -0.0, 0.0, 1.0]])
    mask = pyattr.snip_mask(w, grads, fraction=0.5, largest=False)
    assert torch.equal(mask, torch.tensor([[True, True, False, False]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inputs_are_not_modified(backend, dtype, gen):
    w, norms = make(gen, (6, 20), dtype, snip=False)
    _, grads = make(gen, (6, 20), dtype, snip=True)
    copies = [t.clone() for t in (w, norms, grads)]
    pyattr.wanda_mask(w, norms, fraction=0.4)
    pyattr.snip_mask(w, grads, fraction=0.4, granularity="matrix")
    pyattr.set_difference_mask(w, grads, grads * 0.5, q=0.4, p=0.2)
    for before, after in zip(copies, (w, norms, grads), strict=True):
        assert torch.equal(before, after)


def test_forcing_triton_keeps_the_native_covariance():
    """Pinning the selection kernels must not switch the covariance off its extension."""
    with ops.force_backend("triton"):
        assert ops._use_native(torch.device("cpu"))
        assert ops.backends()["selection[cpu]"] == "Triton kernels (forced)"


# (d_out, d_in) of the linear layers of Llama-2-7B, -13B and -70B (70B's k/v: grouped queries)
REAL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (5120, 5120), (13824, 5120)]
REAL_SHAPES += [(5120, 13824), (8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]


def test_counts_are_exact_on_real_shapes_for_every_three_decimal_fraction():
    """k = ⌊f·n⌋ in integer arithmetic on the decimal typed: for f = i/1000, (i·n) // 1000,
    per row (n = d_in) and over the whole matrix (n = d_out·d_in)."""
    sizes = sorted({d_in for _, d_in in REAL_SHAPES} | {a * b for a, b in REAL_SHAPES})
    for i in range(1001):
        fraction = float(f"{i / 1000:.3f}")
        for n in sizes:
            assert count_for(fraction, n) == i * n // 1000, (fraction, n)
    assert count_for(0.29, 100) == 29 and count_for(1, 7) == 7 and count_for(0, 7) == 0
    with pytest.raises(ValueError, match=r"in \[0, 1\], got nan"):
        count_for(float("nan"), 10)


def _op_cases(gen, dtype):
    """(op, arguments) for every selection operator on ragged shapes, fresh tensors each."""
    w, norms = make(gen, (7, 24), dtype, snip=False)
    _, grads = make(gen, (7, 24), dtype, snip=True)
    factor = norms.sqrt()
    ops_ = torch.ops.pyattr
    return [
        (ops_.row_topk, (w, factor, 5, True, False)),
        (ops_.row_topk, (w, grads, 0, False, True)),
        (ops_.matrix_topk, (w, grads, 31, True, True)),
        (ops_.matrix_topk, (w, factor, 7 * 24, False, False)),
        (ops_.nm, (w, factor, 2, 4, False, False)),
        (ops_.set_difference, (w, grads, grads * 0.5, 9, 4, True, True)),
        (ops_.set_difference, (w, factor, factor.flip(0), 50, 20, False, False)),
        (ops_.row_topk_zero_, (w.clone(), factor, 5, True)),
        (ops_.matrix_topk_zero_, (w.clone(), grads, 31, False)),
        (ops_.nm_zero_, (w.clone(), grads, 1, 8, True)),
        (ops_.set_difference_zero_, (w.clone(), factor, factor.flip(0), 9, 4, True)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_selection_ops_pass_opcheck(backend, dtype, gen):
    """The selection operators are torch custom ops: schemas, mutation annotations and fake
    kernels agree with what the real kernels do, on both backends."""
    for op, args in _op_cases(gen, dtype):
        torch.library.opcheck(op.default, args)


def test_selection_op_compiles_without_graph_break(gen):
    """A function calling the operators compiles whole (fake kernels give the output shapes)
    and returns what the eager call returns."""
    w, grads = make(gen, (9, 40), torch.float32, snip=True)

    def region(w, a, b):
        mask, inter, bad = torch.ops.pyattr.set_difference(w, a, b, 10, 6, True, False)
        packed, _ = torch.ops.pyattr.row_topk(w, a, 10, True, True)
        return mask, inter, bad, packed

    compiled = torch.compile(region, fullgraph=True, backend="aot_eager")
    got, want = compiled(w, grads, grads.flip(1)), region(w, grads, grads.flip(1))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert got[0].dtype == torch.bool and got[3].shape == (9, 5)


def test_selection_op_reports_bad_scores_and_writes_nothing(backend):
    """Called through torch.ops directly, a NaN score comes back as a count, W untouched."""
    w = torch.tensor([[1.0, float("nan"), 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    before = w.clone()
    bad = torch.ops.pyattr.row_topk_zero_(w, torch.ones(4), 2, True)
    assert int(bad) == 1 and torch.equal(w.nan_to_num(), before.nan_to_num())
    _, bad = torch.ops.pyattr.matrix_topk(w, torch.ones(4), 3, True, False)
    assert int(bad) == 1


def test_import_without_triton(tmp_path):
    """Where Triton is not installed, pyattr and every subpackage import, the CPU selection ops
    run, and nothing imports Triton."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        "importlib.util.find_spec = (lambda f: lambda n, *a: None if n == 'triton' else f(n, *a))"
        "(importlib.util.find_spec)\n"
        "import torch, pyattr, pyattr.evaluate, pyattr.toy, pyattr.cli, pyattr.sweep\n"
        "w = torch.randn(6, 20)\n"
        "s = torch.rand(20)\n"
        "m = pyattr.wanda_mask(w, s, fraction=0.3)\n"
        "m2, c = pyattr.set_difference_mask(w, s, s.flip(0), q=0.3, p=0.2, granularity='matrix')\n"
        "pyattr.nm_mask(w, s, n=2, m=4)\n"
        "assert int(m.sum()) == 6 * 6 and c.size_q == 36\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
        "print(pyattr.ops.backends()['selection[cuda]'])\n"
    )
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Triton is not installed" in run.stdout


@pytest.mark.parametrize("snip", [False, True], ids=["wanda", "snip"])
def test_radix_row_select_matches_the_reference(monkeypatch, snip, gen):
    """The alternative long-row select (four 8-bit histogram passes instead of 31 full-row
    counts, PYATTR_ROW_SELECT=radix) selects exactly the reference's entries: ragged rows
    longer than 2048 columns (one row per program), ties, none and all selected, both
    directions, every output mode, and the set difference."""
    monkeypatch.setenv("PYATTR_ROW_SELECT", "radix")
    from pyattr.kernels.row_topk import use_radix

    assert use_radix(1) and not use_radix(4)
    shape = (3, 2051)
    w, stats = make(gen, shape, torch.bfloat16, snip, ties=True)
    _, other = make(gen, shape, torch.bfloat16, snip)
    scores = ref_scores(w, stats)
    op = pyattr.snip_mask if snip else pyattr.wanda_mask
    with ops.force_backend("triton"):
        for fraction in (0.0, 1 / shape[1], 0.03, 0.5, 1.0):
            for largest in (True, False):
                k = count_for(fraction, shape[1])
                want = row_topk_ref(scores, k, largest=largest)
                assert torch.equal(op(w, stats, fraction=fraction, largest=largest), want)
        want = row_topk_ref(scores, count_for(0.1, shape[1]))
        assert torch.equal(op(w, stats, fraction=0.1, output="packed"), pack_bits(want))
        target = w.clone()
        op(target, stats, fraction=0.1, output="zero")
        assert torch.equal(target, w.masked_fill(want, 0))
        mask, counts = pyattr.set_difference_mask(w, stats, other, q=0.2, p=0.1)
    n = shape[1]
    ref, inter = set_difference_ref(
        scores, ref_scores(w, other), count_for(0.2, n), count_for(0.1, n)
    )
    assert torch.equal(mask, ref) and counts.intersection == inter
    monkeypatch.setenv("PYATTR_ROW_SELECT", "heap")
    with pytest.raises(ValueError, match="PYATTR_ROW_SELECT must be"), ops.force_backend("triton"):
        op(w, stats, fraction=0.1)


@pytest.mark.parametrize("snip", [False, True], ids=["wanda", "snip"])
def test_twopass_matrix_select_matches_the_reference(monkeypatch, snip, gen):
    """The alternative matrix-wide select (a 16-bit bucket histogram, then one pass that writes
    the keys above the bucket and compacts those inside it; PYATTR_MATRIX_SELECT=twopass)
    selects exactly the reference's entries: ragged shapes, heavy ties, none and all selected,
    both directions, every output mode, the set difference, and the radix fallback taken when
    the threshold's bucket is too full."""
    import pyattr.kernels.matrix_topk as mt

    monkeypatch.setenv("PYATTR_MATRIX_SELECT", "twopass")
    assert mt.matrix_select() == "twopass"
    op = pyattr.snip_mask if snip else pyattr.wanda_mask
    for shape, floor in [((7, 61), 4096), ((13, 37), 4096), ((13, 37), 0)]:
        monkeypatch.setattr(mt, "_CANDIDATE_FLOOR", floor)
        w, stats = make(gen, shape, torch.bfloat16, snip, ties=True)
        _, other = make(gen, shape, torch.bfloat16, snip)
        scores, numel = ref_scores(w, stats), w.numel()
        with ops.force_backend("triton"):
            for fraction in (0.0, 1 / numel, 0.03, 0.5, 1.0):
                for largest in (True, False):
                    k = count_for(fraction, numel)
                    got = op(w, stats, fraction=fraction, largest=largest, granularity="matrix")
                    assert torch.equal(got, matrix_topk_ref(scores, k, largest=largest))
            want = matrix_topk_ref(scores, count_for(0.3, numel))
            packed = op(w, stats, fraction=0.3, granularity="matrix", output="packed")
            assert torch.equal(packed, pack_bits(want))
            target = w.clone()
            op(target, stats, fraction=0.3, granularity="matrix", output="zero")
            assert torch.equal(target, w.masked_fill(want, 0))
            mask, counts = pyattr.set_difference_mask(
                w, stats, other, q=0.2, p=0.1, granularity="matrix"
            )
        ref, inter = set_difference_ref(
            scores,
            ref_scores(w, other),
            count_for(0.2, numel),
            count_for(0.1, numel),
            per_row=False,
        )
        assert torch.equal(mask, ref) and counts.intersection == inter
    calls = []
    monkeypatch.setattr(mt, "_candidates", lambda *a, **k: calls.append(1))
    flat = torch.full((9, 41), 0.5, dtype=torch.bfloat16)
    with ops.force_backend("triton"):
        got = pyattr.wanda_mask(flat, torch.ones(41), fraction=0.4, granularity="matrix")
    assert not calls, "a bucket holding every key must take the radix route"
    assert torch.equal(got, matrix_topk_ref(torch.full((9, 41), 0.5), count_for(0.4, 9 * 41)))
    monkeypatch.setenv("PYATTR_MATRIX_SELECT", "sort")
    with pytest.raises(ValueError, match="PYATTR_MATRIX_SELECT must be"):
        mt.matrix_select()
