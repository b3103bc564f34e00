"""detX / ERG, eigenvector metrics and fix_fingers="xmin_peak" against WeightWatcher 0.7.7 itself,
on the real pretrained MiniLM. These are reference tests: they do not skip."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import powerlaw
import pytest
import scipy.linalg
import weightwatcher as ww
import weightwatcher.weightwatcher as ww_module

from frogwatch.analyze import analyze
from frogwatch.diagnostics.detx import DETX_COLUMNS, detx_columns
from frogwatch.diagnostics.vectors import VECTOR_COLUMNS
from frogwatch.powerlaw_fit import fit_power_law
from frogwatch.sources import layer_matrices

logging.getLogger("weightwatcher").setLevel(logging.CRITICAL + 1)
WW_VECTOR_COLUMNS = VECTOR_COLUMNS[:12]


def run_ww(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher(model=model).analyze(**kwargs)


@pytest.fixture(scope="module")
def ww_detx_vectors(minilm_session):
    return run_ww(minilm_session, detX=True, vectors=True)


@pytest.fixture(scope="module")
def fw_detx_vectors(minilm_session):
    return analyze(minilm_session, detX=True, vectors=True, progress=False)


def test_detx_columns_match_weightwatcher(ww_detx_vectors, fw_detx_vectors):
    wdf, fw = ww_detx_vectors, fw_detx_vectors
    assert len(fw) == len(wdf) == 39
    for c in ("detX_num", "num_ERG_spikes", "ERG_gap"):
        np.testing.assert_array_equal(fw[c].to_numpy(float), wdf[c].to_numpy(float), err_msg=c)
    for c in ("detX_val", "detX_val_unrescaled"):
        np.testing.assert_allclose(fw[c].to_numpy(float), wdf[c].to_numpy(float), rtol=1e-10, err_msg=c)
    # not a trivial agreement: the ERG tail and the power-law tail differ on this model
    assert (wdf["ERG_gap"] != 0).any() and wdf["detX_num"].nunique() > 10


def test_detx_brute_force_loop():
    """WeightWatcher's loop, written out, on spectra where the product crosses 1 at many places."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        ev = np.sort(rng.lognormal(0, rng.uniform(0.3, 3), size=int(rng.integers(2, 300))))
        cols = detx_columns(ev, 5)
        x = ev * ev.size / ev.sum()
        num, idx = ev.size, 0
        for idx in range(ev.size - 1, 0, -1):
            if np.prod(x[idx:]) < 1.0:
                num = ev.size - idx
                break
        assert cols["detX_num"] == num
        assert cols["detX_val_unrescaled"] == pytest.approx(x[idx], rel=1e-12)
        assert cols["ERG_gap"] == num - 5


def test_vector_columns_match_weightwatcher(minilm_session, ww_detx_vectors, fw_detx_vectors):
    wdf, fw = ww_detx_vectors, fw_detx_vectors
    # WeightWatcher splits bulk/tail by comparing eigenvalues from scipy.linalg.eig with xmin; the
    # eigenvalue equal to xmin then falls on either side by round-off. Where its split equals the
    # fit's tail (frogwatch's definition), every column must agree to round-off.
    lms = {lm.name: lm for lm in layer_matrices(minilm_session)}
    same = []
    for k, lm in enumerate(lms[n] for n in fw["name"]):
        W = lm.load().double().numpy()
        X = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        ww_tail = int((scipy.linalg.eig(X)[0].real >= wdf["xmin"][k]).sum())
        same.append(ww_tail == fw["num_pl_spikes"][k])
    same = np.array(same)
    assert same.sum() >= 15, same.sum()
    for c in WW_VECTOR_COLUMNS:
        a, b = fw[c].to_numpy(float), wdf[c].to_numpy(float)
        np.testing.assert_allclose(a[same], b[same], rtol=1e-9, err_msg=c)
        # elsewhere one eigenvector moved between bulk and tail: the bulk means barely change
        if c.startswith("bulk_mean"):
            np.testing.assert_allclose(a, b, rtol=2e-3, err_msg=c)
    for c in VECTOR_COLUMNS[12:]:
        assert fw[c].between(0, 1).all(), c


def test_top_participation_and_entropy_by_hand():
    from frogwatch.diagnostics.vectors import vector_columns

    rng = np.random.default_rng(1)
    W = rng.standard_normal((30, 50))
    W += 40 * np.outer(np.eye(30)[3], rng.standard_normal(50))  # top direction: one coordinate
    cols = vector_columns([W], num_tail=1)
    ev, V = np.linalg.eigh(W @ W.T)
    v = V[:, -1]
    assert cols["top_participation"] == pytest.approx(1 / (30 * np.sum(v**4)))
    assert cols["top_participation"] < 0.1
    p = v**2
    assert cols["top_entropy"] == pytest.approx(-np.sum(p * np.log(p)) / np.log(30))
    assert cols["tail_participation"] == pytest.approx(cols["top_participation"])


def _powerlaw_shim(calls):
    """WeightWatcher 0.7.7 passes powerlaw.Fit a ``distribution`` keyword that powerlaw >= 2.0
    no longer takes, so its xmin_peak fails on every layer; this forwards the same call without it.
    powerlaw 2.0 also bounds a power law's alpha to (0, 3) by default (1.x did not, and neither
    does WeightWatcher's own fit); the unbounded range restores the estimator WeightWatcher meant."""
    original = ww_module.pl_fit

    def pl_fit(data=None, xmin=None, xmax=None, verbose=False, distribution="power_law", pl_package="ww"):
        if pl_package != "powerlaw":
            return original(data=data, xmin=xmin, xmax=xmax, verbose=verbose,
                            distribution=distribution, pl_package=pl_package)  # fmt: skip
        calls.append(xmin)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return powerlaw.Fit(data, xmin=xmin, xmax=xmax, verbose=False, xmin_distribution=distribution,
                                parameter_ranges={"alpha": [1, 1000]})  # fmt: skip

    return pl_fit


def test_xmin_peak_matches_weightwatcher(minilm_session, monkeypatch):
    calls = []
    monkeypatch.setattr(ww_module, "pl_fit", _powerlaw_shim(calls))
    wdf = run_ww(minilm_session, fix_fingers="xmin_peak", pl_package="powerlaw")
    assert len(calls) == 39 and all(len(c) == 2 for c in calls)  # WeightWatcher's own xmin ranges
    fw = analyze(minilm_session, fix_fingers="xmin_peak", progress=False)
    assert (wdf["status"] == "success").all() and (fw["status"] == "success").all()
    np.testing.assert_allclose(fw["alpha"], wdf["alpha"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fw["xmin"], wdf["xmin"], rtol=1e-12)
    np.testing.assert_allclose(fw["D"], wdf["D"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(fw["num_pl_spikes"], wdf["num_pl_spikes"])
    plain = analyze(minilm_session, progress=False)
    assert (np.abs(fw["alpha"] - plain["alpha"]) > 0.1).sum() >= 5  # the option changes fits


def test_xmin_peak_without_weightwatcher_is_xmin_capped_below_peak():
    rng = np.random.default_rng(2)
    ev = np.concatenate([rng.gamma(4, 0.25, 400), 3 + rng.pareto(1.5, 40)])
    fit = fit_power_law(ev, fix_fingers="xmin_peak")
    x = np.sort(ev)
    counts, edges = np.histogram(np.log10(x), bins=100)
    assert fit.status == "success" and fit.xmin < 1.5 * 10 ** edges[np.argmax(counts)]
    with pytest.raises(ValueError, match="xmin_peak"):
        fit_power_law(ev, fix_fingers="xmin_peek")
