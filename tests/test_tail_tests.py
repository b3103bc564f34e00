"""Likelihood-ratio tail tests against calling powerlaw directly."""

from __future__ import annotations

import warnings

import numpy as np
import powerlaw
import pytest

from frogwatch.diagnostics.tail_tests import TAIL_TEST_COLUMNS, tail_tests


def powerlaw_reference(evals, xmin, alt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(evals, xmin=xmin, xmax=None, verbose=False)
        return fit.power_law.alpha, fit.distribution_compare("power_law", alt)


def test_tail_tests_match_powerlaw_on_minilm(minilm_df, minilm_session):
    from frogwatch.analyze import analyze

    df = analyze(minilm_session, tail_tests=True, progress=False, layers=list(range(3, 20)))
    assert set(TAIL_TEST_COLUMNS) <= set(df.columns)
    checked = 0
    from frogwatch.sources import layer_matrices
    from frogwatch.spectra import esd_matrices, spectrum

    lms = {lm.name: lm for lm in layer_matrices(minilm_session)}
    for _, row in df.iterrows():
        # powerlaw's own alpha is the analytic MLE (the one frogwatch uses) only inside (1.5, 3]
        if not 1.5 < row["alpha"] <= 3:
            continue
        lm = lms[row["name"]]
        ev = spectrum([m for _, m in esd_matrices(lm, lm.load().double())]).evals
        for alt in ("lognormal", "exponential"):
            alpha, (R, p) = powerlaw_reference(ev[ev > 1e-5], row["xmin"], alt)
            assert alpha == pytest.approx(row["alpha"], rel=1e-9)
            assert row[f"R_{alt}"] == pytest.approx(R, rel=1e-6, abs=1e-9)
            assert row[f"p_{alt}"] == pytest.approx(p, rel=1e-6, abs=1e-12)
        checked += 1
    assert checked >= 8


def test_tail_tests_tell_power_law_from_exponential():
    rng = np.random.default_rng(0)
    pl = 1.0 * (1 - rng.random(2000)) ** (-1 / 1.5)  # Pareto, alpha = 2.5
    ex = 1.0 + rng.exponential(1.0, 2000)
    a_pl = 1 + pl.size / np.log(pl / pl.min()).sum()
    r = tail_tests(pl, a_pl, pl.min())
    assert r["R_exponential"] > 0 and r["p_exponential"] < 0.01
    alpha, (R, p) = powerlaw_reference(pl, pl.min(), "exponential")
    assert r["R_exponential"] == pytest.approx(R, rel=1e-6)
    a_ex = 1 + ex.size / np.log(ex / ex.min()).sum()
    r = tail_tests(ex, a_ex, ex.min())
    assert r["R_exponential"] < 0 and r["p_exponential"] < 0.01


def test_tail_tests_nan_for_bad_input():
    r = tail_tests(np.ones(10), np.nan, 1.0)
    assert all(np.isnan(v) for v in r.values())
