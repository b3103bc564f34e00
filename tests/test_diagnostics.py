"""Correlation traps, the MP fit, over-parameterization and scale collapse (analyze's columns).

Planted defects in the real pretrained all-MiniLM-L6-v2, and WeightWatcher 0.7.7's own
``randomize=True`` run as the reference for which layers have traps.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import frogwatch
from frogwatch.analyze import analyze, summary
from frogwatch.diagnostics.collapse import collapse_threshold, scale_collapse
from frogwatch.diagnostics.flow import TRUST_MAX_D, TRUST_MIN_TAIL, overparameterized, trusted_fit
from frogwatch.diagnostics.mp import fit_mp, mp_density, mp_quantiles, tracy_widom_scale
from frogwatch.diagnostics.traps import (
    RANDOMIZE_COLUMNS,
    esd_distance,
    layer_rng,
    randomized_eigenvalues,
    shuffle_entries,
)

MP_COLS = ["num_spikes", "sigma_mp", "mp_softrank", "bulk_max", "bulk_min"]
PLANT_TRAP = "encoder.layer.2.attention.self.query"
PLANT_SCALE = "encoder.layer.3.attention.self.value"
UNTOUCHED = ["encoder.layer.0.attention.self.key", "encoder.layer.0.output.dense", "pooler.dense"]


@pytest.fixture(scope="module")
def fw(minilm_session):
    """frogwatch on the untouched MiniLM with traps and MP fit, once for the module."""
    return analyze(minilm_session, randomize=True, mp_fit=True, seed=0, progress=False)


def _weight(model, name):
    return model.get_submodule(name).weight


# ---------------------------------------------------------------------------------------------
# MP law and fit (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Q", [1.0, 4.0, 30522 / 384])
def test_mp_density_is_a_mean_one_distribution(Q):
    a, b = (1 - Q**-0.5) ** 2, (1 + Q**-0.5) ** 2
    x = np.linspace(a, b, 400_001)[1:-1]
    p = mp_density(x, Q)
    assert np.trapezoid(p, x) == pytest.approx(1.0, abs=2e-3)
    assert np.trapezoid(x * p, x) == pytest.approx(1.0, abs=2e-3)
    q = mp_quantiles(np.linspace(0, 1, 20001), Q)
    assert q[0] == pytest.approx(a, abs=1e-9) and q[-1] == pytest.approx(b, rel=1e-9)
    assert np.mean(q) == pytest.approx(1.0, abs=2e-3)  # the law's mean, from its quantiles


def test_tracy_widom_scale_formula():
    # square N x N: N^(-2/3) * 2 * 2^(1/3)
    assert tracy_widom_scale(384, 384) == pytest.approx(384 ** (-2 / 3) * 2 * 2 ** (1 / 3))
    assert tracy_widom_scale(1536, 384, sigma=2.0) == pytest.approx(
        4 * 1536 ** (-2 / 3) * 1.5 * 3 ** (1 / 3)
    )
    with pytest.raises(ValueError):
        tracy_widom_scale(10, 20)


def test_fit_mp_on_noise_and_a_planted_spike():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((1000, 250)) * 0.02
    ev = np.linalg.svd(W, compute_uv=False) ** 2
    fit = fit_mp(ev, 1000, 250)
    assert fit.sigma_mp == pytest.approx(1.0, abs=0.02)
    assert fit.num_spikes == 0
    assert fit.bulk_max * fit.scale == pytest.approx(fit.sigma_mp**2 * 1.5**2)
    assert fit.mp_softrank == pytest.approx(fit.bulk_max / ev.max())
    # the fit is scale-free: the same answer in other units
    fit10 = fit_mp(ev * 10, 1000, 250)
    assert fit10.sigma_mp == pytest.approx(fit.sigma_mp)
    assert fit10.bulk_max == pytest.approx(10 * fit.bulk_max)
    assert fit10.num_spikes == fit.num_spikes
    # one strong rank-1 signal is one spike
    u, v = rng.standard_normal(1000), rng.standard_normal(250)
    W2 = W + 3 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    ev2 = np.linalg.svd(W2, compute_uv=False) ** 2
    fit2 = fit_mp(ev2, 1000, 250)
    assert fit2.num_spikes == 1
    assert fit2.mp_softrank < 0.5


@pytest.mark.parametrize(
    "evals, N, M",
    [(np.array([]), 4, 2), (np.array([1.0, np.nan]), 4, 2), (np.array([1.0, -1.0]), 4, 2),
     (np.zeros(5), 10, 5), (np.ones(5), 4, 5)],
)  # fmt: skip
def test_fit_mp_rejects_bad_input(evals, N, M):
    with pytest.raises(ValueError):
        fit_mp(evals, N, M)


# ---------------------------------------------------------------------------------------------
# Shuffling and ESD distance (pure)
# ---------------------------------------------------------------------------------------------


def test_shuffle_is_a_seeded_permutation():
    W = np.arange(60, dtype=float).reshape(6, 10)
    a = shuffle_entries(W, layer_rng(0, "x"))
    b = shuffle_entries(torch.tensor(W), layer_rng(0, "x"))
    c = shuffle_entries(W, layer_rng(1, "x"))
    d = shuffle_entries(W, layer_rng(0, "y"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    np.testing.assert_array_equal(np.sort(a.ravel()), W.ravel())
    assert a.shape == W.shape
    with pytest.raises(ValueError):
        layer_rng(-1, "x")
    with pytest.raises(ValueError):
        shuffle_entries(np.zeros(5), layer_rng(0, "x"))
    # conv slices are shuffled one by one and pooled
    ev = randomized_eigenvalues([W, W.T], layer_rng(0, "x"))
    assert ev.shape == (12,) and np.all(np.diff(ev) >= 0)


def test_esd_distance_bounds():
    x = np.linspace(1, 2, 100)
    assert esd_distance(x, x) == 0.0
    assert esd_distance(x, x * 1000) == pytest.approx(1.0)
    y = np.linspace(1, 4, 100)
    assert esd_distance(x, y) == pytest.approx(esd_distance(y, x))
    assert 0 < esd_distance(x, y) < 1
    assert math.isnan(esd_distance(np.zeros(3), x))


# ---------------------------------------------------------------------------------------------
# analyze(randomize=True, mp_fit=True) on the real MiniLM
# ---------------------------------------------------------------------------------------------


def test_columns_and_their_definitions(fw):
    for c in RANDOMIZE_COLUMNS + MP_COLS + ["overparameterized", "scale_collapse"]:
        assert c in fw.columns, c
    assert len(fw) == 39
    np.testing.assert_allclose(fw["ww_softrank"], fw["max_rand_eval"] / fw["lambda_max"])
    np.testing.assert_allclose(fw["mp_softrank"], fw["bulk_max"] / fw["lambda_max"])
    assert (fw["rand_num_spikes"] >= 0).all() and (fw["num_spikes"] >= 0).all()
    assert fw["rand_distance"].between(0, 1).all()
    # trained layers have spikes above their MP bulk; shuffled ones are noise of scale ~1
    body = fw[fw["layer_type"] != "embedding"]
    assert (body["num_spikes"] > 0).mean() > 0.9
    assert (body["bulk_max"] < body["lambda_max"]).mean() > 0.9
    assert body["rand_sigma_mp"].between(0.95, 1.02).all()
    # MP soft rank enters the summary
    assert summary(fw)["mp_softrank"] == pytest.approx(body["mp_softrank"].mean())


def test_randomize_is_reproducible_per_layer(minilm_session, fw):
    # a layer's shuffle depends only on (seed, name): a run on 3 layers repeats the full run
    sub = analyze(minilm_session, layers=UNTOUCHED, randomize=True, seed=0, progress=False)
    full = fw.set_index("name").loc[UNTOUCHED]
    for c in RANDOMIZE_COLUMNS:
        np.testing.assert_array_equal(sub[c].to_numpy(), full[c].to_numpy())
    other = analyze(minilm_session, layers=UNTOUCHED, randomize=True, seed=1, progress=False)
    assert not np.array_equal(other["max_rand_eval"].to_numpy(), sub["max_rand_eval"].to_numpy())


def test_planted_huge_entry_is_a_correlation_trap(minilm_session, fw):
    assert fw.set_index("name").loc[PLANT_TRAP, "rand_num_spikes"] == 0
    m = copy.deepcopy(minilm_session)
    W = _weight(m, PLANT_TRAP)
    with torch.no_grad():
        W[17, 42] = 20 * W.abs().max()
    big = float(W[17, 42].detach()) ** 2
    names = [PLANT_TRAP, *UNTOUCHED]
    df = analyze(m, layers=names, randomize=True, seed=0, progress=False).set_index("name")
    assert df.loc[PLANT_TRAP, "rand_num_spikes"] >= 1
    assert df.loc[PLANT_TRAP, "max_rand_eval"] >= 0.9 * big  # the entry is the trap
    # untouched layers: exactly the numbers of the untouched model
    base = fw.set_index("name")
    for n in UNTOUCHED:
        for c in RANDOMIZE_COLUMNS:
            assert df.loc[n, c] == base.loc[n, c], (n, c)


def test_traps_agree_with_weightwatcher(minilm_session, fw):
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    np.random.seed(0)  # WeightWatcher shuffles with numpy's global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wdf = ww.WeightWatcher(model=minilm_session).analyze(randomize=True)
    assert len(wdf) == len(fw) == 39
    # WeightWatcher names a layer by its last module name; both list layers in module order
    assert [n.split(".")[-1] for n in fw["name"]] == list(wdf["name"])
    mine = fw["rand_num_spikes"].to_numpy() > 0
    theirs = wdf["rand_num_spikes"].to_numpy() > 0
    agreement = float(np.mean(mine == theirs))
    print(f"\ntraps agree with WeightWatcher on {agreement:.1%} of 39 layers; "
          f"frogwatch {list(fw['name'][mine])}, WeightWatcher {list(fw['name'][theirs])}")  # fmt: skip
    assert agreement >= 0.85
    # both find the big traps of MiniLM's MLP output matrices (blocks 0-3)
    for i in range(4):
        row = fw["name"] == f"encoder.layer.{i}.output.dense"
        assert mine[row.to_numpy()].all() and theirs[row.to_numpy()].all()


# ---------------------------------------------------------------------------------------------
# Over-parameterization
# ---------------------------------------------------------------------------------------------


def test_overparameterized_needs_a_trusted_fit(fw):
    flagged = set(fw.loc[fw["overparameterized"], "name"])
    expected = fw[(fw["alpha"] > 6) & (fw["status"] == "success")
                  & (fw["num_pl_spikes"] >= TRUST_MIN_TAIL) & (fw["D"] <= TRUST_MAX_D)]  # fmt: skip
    assert flagged == set(expected["name"])
    assert "pooler.dense" in flagged  # alpha ~ 12: sentence-transformers never trains the pooler
    # alpha = 8.4 from a 9-eigenvalue tail is "under-trained" but not trusted enough
    v4 = fw.set_index("name").loc["encoder.layer.4.attention.self.value"]
    assert v4["alpha"] > 6 and v4["warning"] == "under-trained" and v4["num_pl_spikes"] < TRUST_MIN_TAIL
    assert not v4["overparameterized"]
    s = summary(fw)
    body = fw[fw["layer_type"] != "embedding"]
    assert s["overparameterized_share"] == pytest.approx(body["overparameterized"].mean())


def test_overparameterized_rules_on_a_table():
    df = pd.DataFrame({
        "alpha": [7.0, 7.0, 7.0, 7.0, 5.0, np.nan],
        "status": ["success", "success", "success", "failed", "success", "failed"],
        "num_pl_spikes": [50, 5, 50, 50, 50, 0],
        "D": [0.05, 0.05, 0.3, 0.05, 0.05, np.nan],
    })  # fmt: skip
    assert trusted_fit(df).tolist() == [True, False, False, False, True, False]
    assert overparameterized(df).tolist() == [True, False, False, False, False, False]
    with pytest.raises(ValueError):
        overparameterized(df.drop(columns="D"))


# ---------------------------------------------------------------------------------------------
# Scale collapse without a reference
# ---------------------------------------------------------------------------------------------


def test_untouched_minilm_has_no_scale_collapse(fw):
    assert not fw["scale_collapse"].any()


def test_planted_scale_collapse_is_flagged_by_analyze(minilm_session):
    m = copy.deepcopy(minilm_session)
    with torch.no_grad():
        _weight(m, PLANT_SCALE).mul_(0.1)
    df = analyze(m, progress=False)
    assert df.loc[df["scale_collapse"], "name"].tolist() == [PLANT_SCALE]
    # the layer's alpha is unchanged (alpha is scale-free): only the norm reveals it
    assert not df.set_index("name").loc[PLANT_SCALE, "overparameterized"]


def test_scale_collapse_rules_on_a_table():
    base = dict(layer_type="dense", N=64, M=64)
    rows = [dict(base, name=f"h.{i}.attn.q_proj", log_spectral_norm=v)
            for i, v in enumerate([1.0, 1.05, 0.95, 1.02, 0.2])]  # fmt: skip
    rows += [dict(base, name="embed_tokens", layer_type="embedding", log_spectral_norm=-5.0)]
    rows += [dict(base, name=f"h.{i}.mlp.fc1", N=256, log_spectral_norm=v) for i, v in enumerate([1.0, -3.0])]
    df = pd.DataFrame(rows)
    flags = scale_collapse(df)
    assert flags.tolist() == [False, False, False, False, True, False, False, False]
    # near-identical layers: the 0.3 dex floor keeps a 0.1 dex dip unflagged
    assert collapse_threshold(np.array([1.0, 1.0, 1.0, 0.9])) == pytest.approx(0.7)
    assert math.isnan(collapse_threshold(np.array([1.0, 2.0])))


def test_public_names():
    from frogwatch.diagnostics.compare import compare
    from frogwatch.diagnostics.flow import correlation_flow

    assert frogwatch.compare is compare
    assert frogwatch.correlation_flow is correlation_flow
