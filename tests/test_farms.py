"""alpha_farms: windows, pooled eigenvalues against brute force, and the aspect-ratio bias."""

from __future__ import annotations

import numpy as np

from frogwatch.analyze import analyze
from frogwatch.diagnostics.farms import farms_eigenvalues, farms_windows
from frogwatch.powerlaw_fit import fit_power_law


def test_windows_cover_the_matrix_with_a_fixed_aspect_ratio():
    for N, M in ((1536, 384), (384, 384), (100, 30), (50, 9)):
        wins = farms_windows(N, M)
        cover = np.zeros((N, M), int)
        for r, nr, c, nc in wins:
            cover[r : r + nr, c : c + nc] += 1
            assert nr == wins[0][1] and nc == wins[0][3]
        assert (cover >= 1).all()
        assert {nr / nc for _, nr, _, nc in wins} == {1.0}


def test_pooled_eigenvalues_match_brute_force():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((90, 40))
    ev, n = farms_eigenvalues(W.T)  # orientation does not matter
    ref = []
    for r, nr, c, nc in farms_windows(90, 40):
        ref.append(np.linalg.svd(W[r : r + nr, c : c + nc], compute_uv=False) ** 2)
    np.testing.assert_allclose(ev, np.sort(np.concatenate(ref)), rtol=1e-9, atol=1e-12)
    assert n == len(ref) == 5 * 2


def test_analyze_farms_columns(mlp):
    df = analyze(mlp, farms=True, progress=False)
    assert df["alpha_farms"].notna().all() and (df["num_farms_windows"] >= 4).all()
    W = mlp[2].weight.detach().double().numpy()  # 48 x 64
    ref = np.concatenate([np.linalg.svd(W.T[r : r + nr, c : c + nc], compute_uv=False) ** 2
                          for r, nr, c, nc in farms_windows(64, 48)])  # fmt: skip
    fit = fit_power_law(ref)
    assert abs(df.loc[1, "alpha_farms"] - fit.alpha) < 1e-9 and abs(df.loc[1, "D_farms"] - fit.D) < 1e-9
