"""StreamingCovariance against float64 XᵀX: every dtype, ragged shapes, masks, chunking,
buffering, fp64 mode, merging, and every bad input. Each case runs on the native extension and
on the PyTorch fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

import pyattr
from pyattr import NonFiniteActivationError, StreamingCovariance, ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
U32 = 2.0**-24


@pytest.fixture(params=["native", "torch", "wmma"])
def backend(request: pytest.FixtureRequest):
    """Run the test body on the default route (the extension on the CPU, cuBLAS blocks on
    CUDA), on the PyTorch path, and where CUDA is there on the extension's WMMA kernel."""
    if request.param == "wmma" and not torch.cuda.is_available():
        pytest.skip("the WMMA kernel runs on CUDA only")
    route = "wmma" if request.param == "wmma" else "cublas"
    forced = "torch" if request.param == "torch" else None
    with ops.force_backend(forced), ops.cuda_covariance(route):
        yield request.param


def draw(gen, shape, dtype, device="cpu", scale=1.0):
    """Activations with a nonzero mean and a spread of column scales (like real hidden states)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    cols = torch.rand(shape[-1], generator=gen, dtype=torch.float64) * 3 + 0.1
    x = (x + 0.5) * cols * scale
    return x.to(dtype).to(device)


def reference(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, torch.Tensor]:
    """float64 Σ x xᵀ over the counted rows (the values x holds, exactly)."""
    rows = x.reshape(-1, x.shape[-1]).double().cpu()
    if mask is not None:
        rows = rows[mask.reshape(-1).cpu()]
    return rows.shape[0], rows.T @ rows


def fp32_baseline_error(x: torch.Tensor, mask: torch.Tensor | None, ref: torch.Tensor) -> float:
    """Error of the plain PyTorch fp32 GEMM on the same rows: the yardstick for fp32 sums."""
    rows = x.reshape(-1, x.shape[-1]).float().cpu()
    if mask is not None:
        rows = rows[mask.reshape(-1).cpu()]
    return float((rows.T @ rows).double().sub(ref).abs().max())


def assert_close_to_reference(res, x, mask, acc_dtype=torch.float32, updates=1):
    """``updates``: how many fp32 additions built sum_sq (each rounds once, ≤ u/2 relative)."""
    n, ref = reference(x, mask)
    assert res.n == n
    cov = res.covariance.double().cpu()
    assert torch.equal(res.covariance, res.covariance.T), "covariance is not exactly symmetric"
    assert torch.equal(res.covariance.diagonal(), res.sum_sq), "diagonal differs from sum_sq"
    scale = float(ref.diagonal().max()) if n else 1.0
    err = float((cov - ref).abs().max())
    if acc_dtype == torch.float64:
        assert err <= 1e-12 * scale, f"fp64 error {err:.3e} at scale {scale:.3e}"
    else:
        yardstick = fp32_baseline_error(x, mask, ref)
        assert err <= 2 * yardstick + 4 * U32 * scale, (
            f"error {err:.3e} exceeds 2x PyTorch fp32's {yardstick:.3e} (+4u·{scale:.3e})"
        )
    sq_ref = ref.diagonal()
    sq_err = float((res.sum_sq.double().cpu() - sq_ref).abs().max())
    unit = 1e-12 if acc_dtype == torch.float64 else (updates + 1) * U32
    tol = unit * max(float(sq_ref.max()), 1.0)
    assert sq_err <= tol


def mask_of(kind: str, shape, gen, device):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return (torch.rand(shape, generator=gen) < 0.6).to(device)


def test_extension_is_built_and_used():
    """CI builds pyattr._C; the package must use it, not fall back silently."""
    assert ops.extension_error() is None, ops.extension_error()
    assert "C++ extension" in ops.backends()["covariance[cpu]"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 129, 1000])
@pytest.mark.parametrize("mask_kind", ["none", "all", "empty", "random"])
def test_matches_float64(backend, device, dtype, d, mask_kind, gen):
    tokens = int(torch.randint(1, 700, (1,), generator=gen))
    x = draw(gen, (tokens, d), dtype, device)
    mask = mask_of(mask_kind, (tokens,), gen, device)
    acc = StreamingCovariance(d)
    counted = acc.update(x, mask)
    res = acc.result()
    assert counted == res.n
    assert_close_to_reference(res, x, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("buffer_rows", [0, 37, 4096])
def test_chunked_updates_equal_one_shot(backend, device, dtype, buffer_rows, gen):
    """Ragged (batch, seq, d) pieces with masks, through small and large buffers."""
    d = 129
    pieces = []
    for _ in range(7):
        batch = int(torch.randint(1, 4, (1,), generator=gen))
        seq = int(torch.randint(1, 60, (1,), generator=gen))
        x = draw(gen, (batch, seq, d), dtype, device)
        pieces.append((x, mask_of("random", (batch, seq), gen, device)))
    streamed = StreamingCovariance(d, buffer_rows=buffer_rows)
    for x, m in pieces:
        streamed.update(x, m)
    whole_x = torch.cat([x.reshape(-1, d) for x, _ in pieces])
    whole_m = torch.cat([m.reshape(-1) for _, m in pieces])
    one = StreamingCovariance(d, buffer_rows=buffer_rows)
    one.update(whole_x, whole_m)
    a, b = streamed.result(), one.result()
    assert a.n == b.n == int(whole_m.sum())
    assert_close_to_reference(a, whole_x, whole_m, updates=len(pieces))
    assert_close_to_reference(b, whole_x, whole_m)


def test_update_larger_than_a_token_chunk(backend, gen):
    """More counted rows than one converted chunk (8192) and than the buffer: the direct path."""
    x = draw(gen, (9001, 301), torch.bfloat16)
    mask = mask_of("random", (9001,), gen, "cpu")
    mask[:8500] = True
    acc = StreamingCovariance(301)
    acc.update(x, mask)
    assert_close_to_reference(acc.result(), x, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float64_accumulation(backend, device, dtype, gen):
    x = draw(gen, (5, 211, 67), dtype, device, scale=1e3)
    mask = mask_of("random", (5, 211), gen, device)
    acc = StreamingCovariance(67, accumulate_dtype=torch.float64, buffer_rows=300)
    for i in range(5):
        acc.update(x[i], mask[i])
    res = acc.result()
    assert res.covariance.dtype == torch.float64
    assert_close_to_reference(res, x, mask, acc_dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_diagonal_only(backend, device, gen):
    x = draw(gen, (3, 50, 33), torch.bfloat16, device)
    mask = mask_of("random", (3, 50), gen, device)
    acc = StreamingCovariance(33, diagonal_only=True)
    acc.update(x, mask)
    res = acc.result()
    assert res.covariance is None
    n, ref = reference(x, mask)
    assert res.n == n
    torch.testing.assert_close(res.sum_sq.double().cpu(), ref.diagonal(), rtol=2 * U32, atol=0)
    torch.testing.assert_close(res.mean_sq.double().cpu(), ref.diagonal() / n, rtol=4 * U32, atol=0)
    with pytest.raises(ValueError, match="diagonal-only"):
        _ = res.mean_covariance


def test_means_and_views(backend, gen):
    x = draw(gen, (40, 9), torch.float32)
    acc = StreamingCovariance(9)
    acc.update(x)
    res = acc.result()
    torch.testing.assert_close(res.mean_covariance, res.covariance / 40)
    view = acc.result(copy=False)
    assert view.covariance.data_ptr() == acc._acc.data_ptr()
    assert torch.equal(view.covariance, res.covariance)
    empty = StreamingCovariance(9).result()
    assert empty.n == 0 and torch.count_nonzero(empty.covariance) == 0
    with pytest.raises(ValueError, match="no tokens were counted"):
        _ = empty.mean_sq


def test_result_then_more_updates(backend, gen):
    """Reading mirrors in place; later updates must still land on the upper triangle only."""
    x = draw(gen, (300, 450), torch.float32)
    acc = StreamingCovariance(450, buffer_rows=64)
    acc.update(x[:100])
    acc.result(copy=False)
    acc.update(x[100:])
    assert_close_to_reference(acc.result(), x, None, updates=2)


def test_deterministic(backend, gen):
    x = draw(gen, (2, 333, 520), torch.bfloat16)
    runs = []
    for _ in range(2):
        acc = StreamingCovariance(520, buffer_rows=100)
        acc.update(x[0])
        acc.update(x[1])
        runs.append(acc.result())
    assert torch.equal(runs[0].covariance, runs[1].covariance)
    assert torch.equal(runs[0].sum_sq, runs[1].sum_sq)


@pytest.mark.parametrize("d", [1, 255, 256, 257, 700, 1000, 4133])
def test_triangle_blocks_cover_upper_triangle_once(d):
    """The recursive blocks (shared by the native and PyTorch paths) tile j >= i exactly once."""
    hits = torch.zeros(d, d, dtype=torch.int32)
    for r0, r1, c0, c1 in ops.triangle_blocks(0, d):
        assert r0 < r1 <= c1 and c0 < c1 and (c0 == r0 or c0 >= r1), (r0, r1, c0, c1)
        assert c0 != r0 or r1 - r0 <= 256
        hits[r0:r1, c0:c1] += 1
    assert torch.equal(torch.triu(hits), torch.triu(torch.ones_like(hits)))


def test_native_equals_fallback_closely(gen):
    x = draw(gen, (700, 390), torch.bfloat16)
    results = []
    for name in (None, "torch"):
        with ops.force_backend(name):
            acc = StreamingCovariance(390)
            acc.update(x)
            results.append(acc.result())
    scale = float(results[0].covariance.diagonal().max())
    assert float((results[0].covariance - results[1].covariance).abs().max()) <= 8 * U32 * scale


def test_merge_equals_single_stream(backend, gen):
    x = draw(gen, (500, 70), torch.float16)
    mask = mask_of("random", (500,), gen, "cpu")
    a, b = StreamingCovariance(70), StreamingCovariance(70, buffer_rows=0)
    a.update(x[:230], mask[:230])
    b.update(x[230:], mask[230:])
    a.merge(b)
    assert_close_to_reference(a.result(), x, mask, updates=2)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(StreamingCovariance(71))
    with pytest.raises(TypeError):
        a.merge("nope")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("buffer_rows", [0, 4096])
def test_non_finite_leaves_accumulator_unchanged(backend, device, bad, buffer_rows, gen):
    d = 45
    good = draw(gen, (80, d), torch.bfloat16, device)
    later = draw(gen, (60, d), torch.bfloat16, device)
    acc = StreamingCovariance(d, buffer_rows=buffer_rows, name="layers.3.mlp.down_proj")
    acc.update(good)
    before = acc.result()
    poisoned = draw(gen, (50, d), torch.bfloat16, device)
    poisoned[17, 11] = bad
    with pytest.raises(NonFiniteActivationError, match=r"layers\.3\.mlp\.down_proj.*features 11"):
        acc.update(poisoned)
    after = acc.result()
    assert after.n == before.n
    assert torch.equal(after.sum_sq, before.sum_sq)
    assert torch.equal(after.covariance, before.covariance)
    acc.update(later)
    assert_close_to_reference(acc.result(), torch.cat([good, later]), None, updates=2)


def test_non_finite_in_masked_out_rows_is_ignored(backend, gen):
    x = draw(gen, (30, 12), torch.float32)
    x[5, 3] = float("nan")
    mask = torch.ones(30, dtype=torch.bool)
    mask[5] = False
    acc = StreamingCovariance(12)
    acc.update(x, mask)
    assert_close_to_reference(acc.result(), x, mask)


def test_overflow_is_reported(backend):
    x = torch.full((4, 3), 3e38, dtype=torch.float32)
    acc = StreamingCovariance(3)
    with pytest.raises(NonFiniteActivationError, match="overflow"):
        acc.update(x)
    assert acc.n == 0


def test_bad_inputs():
    acc = StreamingCovariance(8, device="cpu")
    x = torch.randn(4, 8)
    cases = [
        (ValueError, r"\(tokens, d\) or \(batch, seq, d\).*\(8,\)", lambda: acc.update(x[0])),
        (ValueError, r"\(1, 2, 2, 8\)", lambda: acc.update(x.reshape(1, 2, 2, 8))),
        (ValueError, r"d=8 .*\(4, 7\)", lambda: acc.update(x[:, :7])),
        (TypeError, "torch.int64", lambda: acc.update(x.long())),
        (TypeError, "torch.complex64", lambda: acc.update(x.to(torch.complex64))),
        (TypeError, "torch.Tensor, got list", lambda: acc.update([[0.0] * 8])),
        (
            ValueError,
            "x is on meta but this accumulator is on cpu",
            lambda: acc.update(torch.empty(4, 8, device="meta")),
        ),
        (
            ValueError,
            r"leading shape \(4,\), got \(3,\)",
            lambda: acc.update(x, torch.ones(3, dtype=torch.bool)),
        ),
        (TypeError, "torch.bool, got torch.int64", lambda: acc.update(x, torch.ones(4).long())),
        (TypeError, "token_mask must be a torch.Tensor", lambda: acc.update(x, [True] * 4)),
        (
            ValueError,
            "token_mask is on meta",
            lambda: acc.update(x, torch.ones(4, dtype=torch.bool, device="meta")),
        ),
        (ValueError, "positive int", lambda: StreamingCovariance(0)),
        (ValueError, "positive int", lambda: StreamingCovariance(3.0)),
        (
            TypeError,
            "accumulate_dtype",
            lambda: StreamingCovariance(3, accumulate_dtype=torch.bfloat16),
        ),
        (ValueError, "buffer_rows", lambda: StreamingCovariance(3, buffer_rows=-1)),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()
    bad_backend = "backend must be 'torch', 'triton' or None, got 'numpy'"
    with pytest.raises(ValueError, match=bad_backend), ops.force_backend("numpy"):
        pass
    assert acc.n == 0


def test_native_op_checks_its_arguments():
    """The registered operators validate on their own (they are public through torch.ops)."""
    x = torch.randn(10, 6)
    acc = torch.zeros(6, 6)
    with pytest.raises(RuntimeError, match=r"index values must lie in \[0, 10\)"):
        torch.ops.pyattr.syrk_upper_(acc, x, torch.tensor([0, 10]))
    with pytest.raises(RuntimeError, match="acc is 5 x 5 but x has 6 features"):
        torch.ops.pyattr.syrk_upper_(torch.zeros(5, 5), x, None)
    with pytest.raises(TypeError, match="acc must be fp32 or fp64, got Half"):
        torch.ops.pyattr.syrk_upper_(acc.half(), x, None)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous \(2, 6\)"):
        torch.ops.pyattr.sumsq_gather(x, torch.tensor([1, 2]), torch.empty(3, 6))
    assert torch.count_nonzero(acc) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck(device, gen):
    """Schemas, mutation annotations and fake (meta) kernels agree with the real kernels."""
    x = draw(gen, (37, 21), torch.bfloat16, device)
    index = torch.tensor([0, 3, 4, 30], device=device)
    out = torch.empty(4, 21, device=device)
    torch.library.opcheck(torch.ops.pyattr.sumsq_gather.default, (x, index, out))
    torch.library.opcheck(torch.ops.pyattr.sumsq_gather.default, (x, None, None))
    acc = torch.zeros(21, 21, device=device)
    torch.library.opcheck(torch.ops.pyattr.syrk_upper_.default, (acc, x, index))


@pytest.mark.requires_cuda
def test_cuda_full_size(backend, gen):
    """A Llama-7B MLP width on the GPU, bf16 with a ragged mask, against float64."""
    x = draw(gen, (2, 1031, 4096), torch.bfloat16, "cuda")
    mask = mask_of("random", (2, 1031), gen, "cuda")
    acc = StreamingCovariance(4096)
    acc.update(x, mask)
    assert_close_to_reference(acc.result(), x, mask)


def test_selfcheck_passes(capsys):
    from pyattr.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "covariance[cpu]" in out and "ok" in out
    assert pyattr.__version__ in out


def test_cuda_covariance_route_is_chosen_in_one_place(monkeypatch):
    """On CUDA the covariance product runs as cuBLAS blocks unless the WMMA kernel is asked for
    (the benchmark flips it); the CPU keeps the C++ extension either way."""
    from pyattr.ops import _dispatch

    assert "cuBLAS GEMM per triangle block" in ops.backends()["covariance[cuda]"]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with ops.cuda_covariance("wmma"):
        assert "WMMA" in ops.backends()["covariance[cuda]"]
        assert _dispatch._use_native(cpu, product=True) == (ops.extension_error() is None)
    monkeypatch.setattr(_dispatch, "_native_cuda", lambda: True)
    assert not _dispatch._use_native(cuda, product=True)
    assert _dispatch._use_native(cuda) == (ops.extension_error() is None)  # Σx² gather
    with ops.cuda_covariance("wmma"):
        assert _dispatch._use_native(cuda, product=True) == (ops.extension_error() is None)
    with (
        pytest.raises(ValueError, match="route must be 'cublas' or 'wmma'"),
        ops.cuda_covariance("cutlass"),
    ):
        pass
