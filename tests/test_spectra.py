"""frogwatch.spectra against numpy's SVD: every route to the eigenvalues (Gram by ?syrk in each
memory layout and block size, float32 accumulation, two-stage LAPACK, torch), conv2d slicing and
scaling, numerical rank, device resolution and the finiteness check."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from frogwatch import spectra
from frogwatch.sources import LayerMatrix
from frogwatch.spectra import eigenvalues, esd_matrices, gram_cpu, spectrum


def np_evals(W) -> np.ndarray:
    """Squared singular values from numpy's SVD in float64, ascending."""
    A = W.detach().double().numpy() if isinstance(W, torch.Tensor) else np.asarray(W, np.float64)
    return np.sort(np.linalg.svd(A, compute_uv=False) ** 2)


def _W(rows, cols, seed=0, dtype=torch.float64):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (9, 9)])
@pytest.mark.parametrize("layout", ["c", "f", "numpy", "strided"])
def test_gram_eigenvalues_in_every_layout(shape, layout):
    W = _W(*shape)
    if layout == "f":
        W = W.T.contiguous().T  # Fortran-ordered view
    elif layout == "numpy":
        W = W.numpy()
    elif layout == "strided":
        W = _W(shape[0], 2 * shape[1])[:, ::2]  # neither C nor F contiguous: the blocked path
    G = gram_cpu(W)
    M = min(shape)
    assert G.shape == (M, M) and G.dtype == np.float64
    A = np.asarray(W if isinstance(W, np.ndarray) else W.numpy())
    A = A if shape[0] >= shape[1] else A.T
    np.testing.assert_allclose(np.triu(G), np.triu(A.T @ A), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(eigenvalues(W), np_evals(W), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(40, 7), (7, 40)])
def test_blocked_gram_over_many_blocks(monkeypatch, shape):
    # a float32 W takes the blocked route; 8-byte rows x 7 columns x ... : force 256-row blocks
    W = _W(*shape, dtype=torch.float32)
    monkeypatch.setattr(spectra, "BLOCK_BYTES", 1)
    big = torch.randn(700, 5, generator=torch.Generator().manual_seed(1)).float()  # 3 blocks of 256
    for X in (W, big, big.T):
        A = X.double().numpy()
        A = A if A.shape[0] >= A.shape[1] else A.T
        np.testing.assert_allclose(np.triu(gram_cpu(X)), np.triu(A.T @ A), rtol=1e-12)
        np.testing.assert_allclose(eigenvalues(X), np_evals(X), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_accumulate_in_float32(dtype):
    W = _W(50, 20, dtype=dtype)
    assert spectra.gram_dtype(W) == np.float32 and spectra.gram_dtype(W.float()) == np.float64
    assert spectra.gram_dtype(W.float().numpy()) == np.float64
    ev = eigenvalues(W)
    ref = np_evals(W)  # the exact eigenvalues of the stored low-precision values
    np.testing.assert_allclose(ev, ref, rtol=1e-5, atol=1e-5 * ref[-1])
    assert ev.dtype == np.float64
    # the float32 accumulation is the only rounding: a float64 Gram matrix of the same values differs
    exact = gram_cpu(W, dtype=np.float64)
    assert not np.array_equal(gram_cpu(W), exact)
    A = W.double().numpy()
    np.testing.assert_allclose(np.triu(exact), np.triu(A.T @ A), rtol=1e-12)


def test_two_stage_solver_from_a_threshold(monkeypatch):
    solve = spectra._two_stage_solver()
    if solve is None:
        pytest.skip("this OpenBLAS has no dsyevd_2stage")  # CI installs numpy's wheel, which has it
    W = _W(60, 40)
    calls = []
    monkeypatch.setattr(spectra, "TWO_STAGE_MIN_M", 40)
    monkeypatch.setattr(spectra, "_two_stage_solver", lambda: (lambda G: calls.append(G.shape) or solve(G)))
    np.testing.assert_allclose(eigenvalues(W), np_evals(W), rtol=1e-10, atol=1e-12)
    assert calls == [(40, 40)]
    eigenvalues(_W(60, 39))
    assert calls == [(40, 40)]  # below the threshold: numpy's eigvalsh
    G = np.asfortranarray(np.diag([3.0, 1.0, 2.0]))
    np.testing.assert_allclose(solve(G), [1.0, 2.0, 3.0])


def test_svd_and_torch_routes_agree_with_numpy():
    W = _W(25, 10)
    for kwargs in ({"method": "svd"}, {"device": torch.device("cpu")},
                   {"method": "svd", "device": torch.device("cpu")}):  # fmt: skip
        ev = eigenvalues(W, **kwargs)
        assert ev.dtype == np.float64 and ev.shape == (10,)
        np.testing.assert_allclose(ev, np_evals(W), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(eigenvalues(W.numpy(), method="svd"), np_evals(W), rtol=1e-10)
    np.testing.assert_allclose(eigenvalues(W.T, device=torch.device("cpu")), np_evals(W), rtol=1e-10)
    with pytest.raises(ValueError) as e:
        eigenvalues(W, method="eig")
    assert str(e.value) == "method must be 'gram' or 'svd', got 'eig'"


def test_gram_round_off_below_zero_is_clipped():
    W = _W(30, 3) @ _W(3, 12, seed=1)  # rank 3: nine eigenvalues are round-off around 0
    ev = eigenvalues(W)
    assert ev.min() >= 0.0 and np.all(np.diff(ev) >= 0)
    np.testing.assert_allclose(ev[-3:], np_evals(W)[-3:], rtol=1e-10)


def test_conv2d_slices_and_scales():
    W = torch.randn(6, 4, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lm = LayerMatrix("c", "conv2d", (6, 4, 3, 2), lambda: W)
    pooled = esd_matrices(lm, W)
    assert [s for s, _ in pooled] == [""] * 6
    for (_, M), (i, j) in zip(pooled, [(i, j) for i in range(3) for j in range(2)]):
        torch.testing.assert_close(M, W[:, :, i, j] * math.sqrt(0.5), rtol=0, atol=0)
    sliced = esd_matrices(lm, W, pool=False)
    assert [s for s, _ in sliced] == ["[0,0]", "[0,1]", "[1,0]", "[1,1]", "[2,0]", "[2,1]"]
    for s, M in sliced:
        i, j = int(s[1]), int(s[3])
        torch.testing.assert_close(M, W[:, :, i, j] * math.sqrt(3 * 2 / 2), rtol=1e-15, atol=0)
    D = torch.ones(3, 5)
    assert esd_matrices(LayerMatrix("d", "dense", (3, 5), lambda: D), D) == [("", D)]
    with pytest.raises(ValueError) as e:
        esd_matrices(LayerMatrix("x", "dense", (2, 2, 2), lambda: None), torch.ones(2, 2, 2))
    assert str(e.value) == "x: expected a 2-D or 4-D weight, got shape (2, 2, 2)"


def test_pooled_spectrum_fields():
    mats = [_W(20, 8, seed=s) for s in range(3)]
    mats[1] = mats[1][:, :3] @ _W(3, 8, seed=9)  # a rank-3 slice
    sp = spectrum(mats)
    parts = [np_evals(M) for M in mats]
    np.testing.assert_allclose(sp.evals, np.sort(np.concatenate(parts)), rtol=1e-9, atol=1e-9)
    assert (sp.N, sp.M) == (20, 8)
    assert sp.rank == 8 + 3 + 8
    assert sp.sv_max == pytest.approx(math.sqrt(max(p[-1] for p in parts)), rel=1e-12)
    # the largest per-slice smallest singular value (as WeightWatcher reports pooled conv slices)
    assert sp.sv_min == pytest.approx(math.sqrt(max(p[0] for p in parts)), rel=1e-9)
    wide = spectrum([_W(8, 20)], method="svd")
    assert (wide.N, wide.M, wide.rank) == (20, 8, 8)


def test_numerical_rank_rule():
    # numpy's matrix_rank rule: sv > sv_max * N * eps (svd), lambda > lambda_max * N * eps (gram)
    eps = np.finfo(np.float64).eps
    N = 50
    ev = np.array([0.0, 1e-30, 2.0 * N * eps * 0.999, 2.0 * N * eps * 1.001, 1.0, 2.0])
    assert spectra._rank_from_evals(ev, N, "gram") == 3
    sv_ev = np.array([0.0, (2.0 * N * eps * 0.999) ** 2, (2.0 * N * eps * 1.001) ** 2, 4.0])
    assert spectra._rank_from_evals(sv_ev, N, "svd") == 2
    assert spectra._rank_from_evals(np.array([]), N, "gram") == 0
    W = _W(N, 10)
    W[:, 0] = 0.0
    assert spectrum([W]).rank == np.linalg.matrix_rank(W.numpy()) == 9


def test_resolve_device():
    assert spectra.resolve_device(None) is None
    assert spectra.resolve_device("cpu") == torch.device("cpu")
    assert spectra.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(TypeError) as e:
        spectra.resolve_device(0)
    assert str(e.value) == "device must be a str or torch.device, got 0"
    with pytest.raises(ValueError) as e:
        spectra.resolve_device("gpu0")
    assert str(e.value) == "device must be a torch device such as 'cpu' or 'cuda', got 'gpu0'"
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="^device='cuda' requested but CUDA is not available; using the CPU$"):
            assert spectra.resolve_device("cuda") is None


def test_all_finite_over_blocks():
    W = torch.zeros((1 << 22) + 5, dtype=torch.float32)  # two blocks of the check
    assert spectra.all_finite(W)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, (1 << 22) - 1, (1 << 22) + 4):
            X = W.clone()
            X[pos] = bad
            assert not spectra.all_finite(X), (bad, pos)
    big = torch.full((4, 4), 3e38, dtype=torch.float32)  # finite, but its float32 sum overflows
    assert spectra.all_finite(big)
    assert not spectra.all_finite(torch.ones(3, 4).T.clone().T.mul(float("nan")))  # non-contiguous


def test_eigenvalues_accept_noncontiguous_and_wide_float32_tensors():
    base = torch.randn(16, 30, generator=torch.Generator().manual_seed(3))
    for W in (base, base.T, base[:, ::3], base.T[::2]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ev = eigenvalues(W)
        np.testing.assert_allclose(ev, np_evals(W), rtol=1e-5, atol=1e-5 * float(np_evals(W)[-1]))


def _tiny_sv_matrix():
    """30 x 4 with singular values 1, 0.5, 1e-3, 1e-9: squared, 1e-18 is far below the Gram route's
    round-off (~1e-16 of the largest eigenvalue) but resolved by the SVD."""
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((30, 4)))[0]
    V = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    return torch.from_numpy((U * np.array([1.0, 0.5, 1e-3, 1e-9])) @ V.T)


def test_svd_route_resolves_tiny_singular_values():
    W = _tiny_sv_matrix()
    for kwargs in ({"method": "svd"}, {"method": "svd", "device": torch.device("cpu")}):
        ev = eigenvalues(W, **kwargs)
        assert ev[0] == pytest.approx(1e-18, rel=1e-3, abs=0), kwargs
    for kwargs in ({}, {"device": torch.device("cpu")}):  # the Gram routes cannot see it
        assert eigenvalues(W, **kwargs)[0] != pytest.approx(1e-18, rel=1e-3, abs=0)
    sp = spectrum([W], method="svd")
    assert sp.evals[0] == pytest.approx(1e-18, rel=1e-3, abs=0)
    assert sp.rank == 4  # sv rule: 1e-9 > 1 * 30 * eps
    assert spectrum([W]).rank == 3  # eigenvalue rule: 1e-18 < 1 * 30 * eps


def test_svd_and_torch_routes_compute_in_float64():
    W32 = _W(25, 10).float()
    ref = np_evals(W32)  # exact eigenvalues of the float32 values
    np.testing.assert_allclose(eigenvalues(W32.numpy(), method="svd"), ref, rtol=1e-12)
    np.testing.assert_allclose(eigenvalues(W32, device=torch.device("cpu")), ref, rtol=1e-12)
    Wb = W32.bfloat16()
    np.testing.assert_allclose(eigenvalues(Wb, method="svd"), np_evals(Wb), rtol=1e-12)


def test_zero_matrix_has_rank_zero():
    sp = spectrum([torch.zeros(6, 4, dtype=torch.float64)])
    assert sp.rank == 0 and (sp.evals == 0).all() and sp.sv_max == 0.0


def test_all_finite_on_strided_views():
    X = torch.ones(4, 6)[:, ::2]
    assert not X.is_contiguous() and spectra.all_finite(X)
    Y = torch.ones(4, 6)
    Y[1, 2] = float("nan")
    assert not spectra.all_finite(Y[:, ::2]) and spectra.all_finite(Y[:, 1::2])
