"""The rank level against the definitions: the eigenbasis of W C Wᵀ is the right singular basis
of X Wᵀ (as the released code computed it), and every edit equals its dense-projector formula."""

from __future__ import annotations

import copy

import pytest
import torch
from test_calibrate import sentences, tiny_llama
from test_data import tokenizer
from test_models import build

import pyattr
from pyattr.lowrank import (
    edit_ranks,
    eigenbases,
    eigenbasis,
    keep_top,
    load_eigenbases,
    orthogonal_projection,
    remove_top,
    save_eigenbases,
    subspace_similarity,
)

SAFETY, UTILITY = sentences(24, 1, refuse=True), sentences(24, 2, refuse=False)

SHAPES = [(23, 37), (37, 23), (29, 29)]  # d_out < d_in, d_out > d_in, square; all ragged
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def layer_data(gen, d_out, d_in, n=71, dtype=torch.float64):
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    # activations with a decaying spectrum: distinct eigenvalues, as real activations have
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    x = x * torch.logspace(0, -1.5, d_in, dtype=torch.float64)
    return w.to(dtype), x


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of a and b (orthonormal)."""
    return torch.linalg.svdvals(a.T @ b)


@pytest.mark.parametrize("shape", SHAPES)
def test_eigenbasis_is_the_right_singular_basis_of_x_wt(gen, shape):
    w, x = layer_data(gen, *shape)
    basis = eigenbasis(w, x.T @ x, len(x))
    r = basis.rank
    assert basis.values.shape == (r,) and basis.vectors.shape == (shape[0], r)
    assert bool((basis.values[:-1] >= basis.values[1:]).all())  # descending
    _, s, vh = torch.linalg.svd(x @ w.T, full_matrices=False)
    torch.testing.assert_close(basis.values, s[:r] ** 2 / len(x), rtol=1e-9, atol=1e-12)
    for k in (1, r // 3, r - 1, r):
        cos = principal_cosines(basis.vectors[:, :k], vh[:k].T)
        torch.testing.assert_close(cos, torch.ones(k, dtype=cos.dtype), rtol=0, atol=1e-8)
    # the released code's route: a randomised low-rank SVD of the stored X Wᵀ
    torch.manual_seed(0)
    _, _, v_lowrank = torch.svd_lowrank(x @ w.T, q=8, niter=8)
    cos = principal_cosines(basis.vectors[:, :4], v_lowrank[:, :4])
    assert float(cos.min()) > 1 - 1e-6
    orthonormal = basis.vectors.T @ basis.vectors
    torch.testing.assert_close(orthonormal, torch.eye(r, dtype=torch.float64))
    kept = eigenbasis(w, x.T @ x, len(x), keep=5, dtype=torch.float32)
    assert kept.vectors.shape == (shape[0], 5) and kept.vectors.dtype == torch.float32
    assert float(principal_cosines(kept.vectors.double(), basis.vectors[:, :5]).min()) > 1 - 1e-4


@pytest.mark.parametrize("shape", [*SHAPES, (61, 17)])
@pytest.mark.parametrize("n", [71, 9], ids=["full-rank C", "rank-deficient C"])
def test_input_side_route_equals_the_direct_one(gen, shape, n):
    """The d_in-side route (the default when d_out > d_in) gives the direct route's eigenvalues
    and, at every k where the spectrum has a gap, the same span of the top k eigenvectors; with
    a rank-deficient C (fewer tokens than features) the zero-eigenvalue part is an orthonormal
    completion orthogonal to the rest. float32 stays within its tolerance of float64."""
    w, x = layer_data(gen, *shape, n=n)
    c = x.T @ x
    direct = eigenbasis(w, c, n, route="direct")
    side = eigenbasis(w, c, n, route="input")
    r = direct.rank
    scale = float(direct.values[0])
    torch.testing.assert_close(side.values, direct.values, rtol=0, atol=1e-9 * scale)
    nonzero = int((direct.values > 1e-9 * scale).sum())
    # A's nonzero eigenvalues are X Wᵀ's squared singular values / n: min(r, n) of them unless
    # the random W drawn is itself near singular (a square one can be), counted independently
    expected = int((torch.linalg.svdvals(x @ w.T) ** 2 / n > 1e-9 * scale).sum())
    assert nonzero == expected and expected >= min(r, n) - 1
    for k in sorted({1, nonzero // 2, nonzero}):
        if k == 0 or (k < r and direct.values[k - 1] - direct.values[k] < 1e-6 * scale):
            continue
        cos = principal_cosines(side.vectors[:, :k], direct.vectors[:, :k])
        torch.testing.assert_close(cos, torch.ones(k, dtype=cos.dtype), rtol=0, atol=1e-7)
    gram = side.vectors.T @ side.vectors
    torch.testing.assert_close(gram, torch.eye(r, dtype=gram.dtype), rtol=0, atol=1e-10)
    auto = eigenbasis(w, c, n)
    assert torch.equal(auto.vectors, (side if shape[0] > shape[1] else direct).vectors)
    low = eigenbasis(w, c, n, route="input", dtype=torch.float32, keep=min(3, nonzero))
    torch.testing.assert_close(low.values.double(), direct.values, rtol=0, atol=1e-4 * scale)
    cos = principal_cosines(low.vectors.double(), direct.vectors[:, : low.kept])
    assert float(cos.min()) > 1 - 1e-3
    with pytest.raises(ValueError, match="route must be"):
        eigenbasis(w, c, n, route="smaller")


def dense(u: torch.Tensor) -> torch.Tensor:
    return u @ u.T  # the d_out × d_out projector the implementation never forms


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_edits_equal_the_dense_projector_formulas(gen, shape, dtype):
    w, x = layer_data(gen, *shape, dtype=dtype)
    _, xu = layer_data(gen, *shape)
    safety = eigenbasis(w, x.T @ x, len(x))
    utility = eigenbasis(w, xu.T @ xu, len(xu))
    big_r = safety.rank
    w64 = w.double()
    eye = torch.eye(shape[0], dtype=torch.float64)
    for r in (0, 1, big_r // 2, big_r):
        p = dense(safety.vectors[:, :r])
        for edit, want, bound in ((remove_top, w64 - p @ w64, r), (keep_top, p @ w64, big_r - r)):
            edited = w.clone()
            assert edit(edited, safety, r) == bound
            assert edited.dtype == dtype
            torch.testing.assert_close(edited.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * 4)
    for r_u, r_s in ((0, 0), (big_r, 0), (0, big_r), (big_r // 2, big_r // 3), (3, big_r - 2)):
        pu = dense(utility.vectors[:, : big_r - r_u])
        ps = dense(safety.vectors[:, : big_r - r_s])
        delta = (eye - pu) @ ps @ w64
        edited = w.clone()
        rank = orthogonal_projection(edited, utility, safety, r_u=r_u, r_s=r_s)
        torch.testing.assert_close(
            edited.double(), w64 - delta, rtol=TOL[dtype], atol=TOL[dtype] * 4
        )
        assert rank <= min(r_u, big_r - r_s)
        if dtype == torch.float64:
            floor = 1e-8 * float(torch.linalg.matrix_norm(w64, ord=2))
            assert rank == int(torch.linalg.matrix_rank(delta, atol=floor, rtol=0))
        explicit = w.clone()
        orthogonal_projection(explicit, utility, safety, keep_u=big_r - r_u, keep_s=big_r - r_s)
        assert torch.equal(explicit, edited)


def test_subspace_similarity(gen):
    w, x = layer_data(gen, 31, 19)
    _, xu = layer_data(gen, 31, 19)
    a, b = eigenbasis(w, x.T @ x, len(x)), eigenbasis(w, xu.T @ xu, len(xu))
    assert subspace_similarity(a, a, 5, 5) == pytest.approx(1.0)
    assert subspace_similarity(a, a, 3, 7) == pytest.approx(1.0)  # one contains the other
    want = float((a.vectors[:, :4].T @ b.vectors[:, :6]).pow(2).sum()) / 4
    assert subspace_similarity(a, b, 4, 6) == pytest.approx(want)
    assert 0 <= subspace_similarity(a, b, 4, 6) <= 1
    with pytest.raises(ValueError, match="must be positive"):
        subspace_similarity(a, b, 0, 3)


@pytest.fixture(scope="module")
def calibrated():
    model, tok = tiny_llama(torch.float64), tokenizer()
    safety = pyattr.calibrate(model, tok, SAFETY, collect=("covariance",), progress=False)
    utility = pyattr.calibrate(model, tok, UTILITY, collect=("covariance",), progress=False)
    return model, safety, utility


def test_model_edits_layer_by_layer(calibrated, tmp_path):
    model, safety_stats, utility_stats = calibrated
    safety = eigenbases(model, safety_stats, progress=False)
    utility = eigenbases(model, utility_stats, progress=False)
    layers = {layer.name: layer for layer in pyattr.find_linear_layers(model)}
    assert set(safety) == set(layers)

    removed = copy.deepcopy(model)
    report = edit_ranks(removed, "remove", safety, r=2)
    for layer in pyattr.find_linear_layers(removed):
        w = layers[layer.name].weight.detach()
        u = safety[layer.name].vectors[:, :2]
        torch.testing.assert_close(layer.weight.detach(), w - u @ (u.T @ w))
    assert report.fraction == pytest.approx(
        2 * len(layers) / sum(min(lay.d_out, lay.d_in) for lay in layers.values())
    )

    projected = copy.deepcopy(model)
    report = edit_ranks(projected, "orthogonal", safety, utility, r_u=0.5, r_s=0.75)
    for entry in report.layers.values():
        big_r = entry["R"]
        assert entry["rank"] <= min(big_r // 2, big_r - int(0.75 * big_r))
    one = layers["model.layers.0.self_attn.k_proj"]  # R = 16 (grouped-query), others 32
    assert report.layers[one.name]["R"] == 16

    path = save_eigenbases(safety, tmp_path / "safety.eigen.safetensors", model_id="tiny")
    loaded = load_eigenbases(path, model=model)
    again = copy.deepcopy(model)
    edit_ranks(again, "remove", loaded, r=2)
    for a, b in zip(again.parameters(), removed.parameters(), strict=True):
        assert torch.equal(a, b)
    keep = copy.deepcopy(model)
    edit_ranks(keep, "keep", safety, r=1.0, layers=[one.name])
    torch.testing.assert_close(keep.state_dict()[one.name + ".weight"], one.weight.detach())


def test_conv1d_weights_are_edited_through_their_transpose(gen):
    model = build("gpt2").double()
    layer = pyattr.find_linear_layers(model)[0]
    x = torch.randn(40, layer.d_in, generator=gen, dtype=torch.float64)
    basis = eigenbasis(layer.weight, x.T @ x, 40)
    before = layer.weight.detach().clone()
    remove_top(layer.weight, basis, 3)
    u = basis.vectors[:, :3]
    torch.testing.assert_close(layer.weight.detach(), before - u @ (u.T @ before))


def test_bad_input_is_named(calibrated, gen, tmp_path):
    model, safety_stats, _ = calibrated
    w, x = layer_data(gen, 12, 9)
    c = x.T @ x
    with pytest.raises(ValueError, match=r"covariance is \(8, 8\).*9 features"):
        eigenbasis(w, c[:8, :8], len(x))
    bad = c.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        eigenbasis(w, bad, len(x), name="q_proj")
    with pytest.raises(ValueError, match="no counted token"):
        eigenbasis(w, c, 0)
    with pytest.raises(ValueError, match=r"keep=10 is outside \[0, R\] = \[0, 9\]"):
        eigenbasis(w, c, len(x), keep=10)
    with pytest.raises(TypeError, match="float32 or float64"):
        eigenbasis(w, c, len(x), dtype=torch.bfloat16)
    basis = eigenbasis(w, c, len(x), keep=4)
    with pytest.raises(ValueError, match=r"rank 10 is outside \[0, R\] = \[0, 9\]"):
        remove_top(w.clone(), basis, 10)
    with pytest.raises(ValueError, match="keeps 4; compute it again with a larger keep"):
        remove_top(w.clone(), basis, 5)
    with pytest.raises(ValueError, match="computed from other weights"):
        remove_top(w + 1, basis, 2)
    remove_top(w + 1, basis, 2, check=False)
    with pytest.raises(ValueError, match="d_out = 12, the weight has 11 rows"):
        remove_top(w[:11].clone(), basis, 2)
    with pytest.raises(ValueError, match="exactly one of r_u and keep_u"):
        orthogonal_projection(w.clone(), basis, basis, r_u=1, keep_u=2, r_s=1)
    with pytest.raises(ValueError, match=r"r_s = -1 is outside"):
        orthogonal_projection(w.clone(), basis, basis, r_u=1, r_s=-1)

    safety = eigenbases(model, safety_stats, progress=False)
    with pytest.raises(ValueError, match=r"r = 20 is outside \[0, R\] = \[0, 16\]; give a"):
        edit_ranks(copy.deepcopy(model), "remove", safety, r=20)
    with pytest.raises(ValueError, match="must lie in"):
        edit_ranks(copy.deepcopy(model), "remove", safety, r=1.5)
    with pytest.raises(ValueError, match="needs the utility"):
        edit_ranks(copy.deepcopy(model), "orthogonal", safety, r_u=1, r_s=1)
    with pytest.raises(ValueError, match="no eigenbasis for layer 'nope'"):
        edit_ranks(copy.deepcopy(model), "remove", safety, r=1, layers=["nope"])
    other = build("gpt2").double()
    with pytest.raises(ValueError, match="statistics from another model"):
        eigenbases(other, safety_stats, progress=False)
    path = save_eigenbases(safety, tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="another model|lacks"):
        load_eigenbases(path, model=other)
    no_cov = pyattr.calibrate(model, tokenizer(), SAFETY[:2], collect=("norms",), progress=False)
    with pytest.raises(ValueError, match="covariance was not collected"):
        eigenbases(model, no_cov, progress=False)
