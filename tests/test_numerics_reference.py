"""Reference-free checks of numerics that only the weightwatcher comparison guarded before:
the conv2d scale factors, alpha_weighted, clip_xmax on a planted finger and the Tracy-Widom margin
of the MP spike count. Expected values come from tests/_brute.py (numpy SVD, a loop-per-xmin
Clauset fit) and from factors written here, never from frogwatch itself."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import frogwatch

import _brute  # tests/_brute.py


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 24, 3))


def test_pooled_conv2d_is_scaled_by_sqrt_half():
    model = _conv()
    W = model[0].weight.detach().double().numpy()  # (24, 8, 3, 3)
    # pooled: all 9 slices W[:, :, i, j], each multiplied by sqrt(1/2) -> eigenvalues x 0.5
    ev = np.sort(np.concatenate([_brute.evals(W[:, :, i, j] * math.sqrt(0.5))
                                 for i in range(3) for j in range(3)]))
    row = frogwatch.analyze(model, progress=False).iloc[0]
    assert row["num_evals"] == 8 * 9 and row["rf"] == 9
    assert row["lambda_max"] == pytest.approx(ev[-1], rel=1e-10)
    assert row["norm"] == pytest.approx(0.5 * (W**2).sum(), rel=1e-10)
    assert row["log_spectral_norm"] == pytest.approx(math.log10(ev[-1]), rel=1e-10)
    alpha, xmin, D = _brute.clauset_fit(ev)
    assert row["alpha"] == pytest.approx(alpha, rel=1e-9)
    assert row["xmin"] == pytest.approx(xmin, rel=1e-12)


def test_unpooled_conv2d_slices_are_scaled_by_sqrt_kh_kw_half():
    model = _conv()
    W = model[0].weight.detach().double().numpy()
    df = frogwatch.analyze(model, pool=False, progress=False, min_evals=1)
    assert len(df) == 9
    for _, row in df.iterrows():
        i, j = (int(t) for t in row["name"].split("[")[1].rstrip("]").split(","))
        ev = _brute.evals(W[:, :, i, j] * math.sqrt(3 * 3 / 2))
        assert row["lambda_max"] == pytest.approx(ev[-1], rel=1e-10)
        assert row["norm"] == pytest.approx(ev.sum(), rel=1e-10)


def test_alpha_weighted_is_alpha_times_log10_lambda_max():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 50), nn.Linear(50, 120), nn.Conv2d(4, 16, 3))
    df = frogwatch.analyze(model, progress=False)
    for _, row in df.iterrows():
        W = model.get_submodule(row["name"]).weight.detach().double().numpy()
        if W.ndim == 4:
            lam = max(_brute.evals(W[:, :, i, j] * math.sqrt(0.5))[-1] for i in range(3) for j in range(3))
        else:
            lam = _brute.evals(W)[-1]
        assert row["alpha_weighted"] == pytest.approx(row["alpha"] * math.log10(lam), rel=1e-10)
    s = frogwatch.summary(df)
    assert s["alpha_weighted"] == pytest.approx(df["alpha_weighted"].mean(), rel=1e-12)


def test_clip_xmax_on_a_planted_finger():
    ev = _brute.finger_spectrum()
    W = torch.from_numpy(_brute.matrix_with_evals(ev, 200))
    plain = frogwatch.analyze({"f.weight": W}, progress=False).iloc[0]
    fixed = frogwatch.analyze({"f.weight": W}, fix_fingers="clip_xmax", progress=False).iloc[0]
    a_all = _brute.clauset_fit(ev)[0]
    assert plain["alpha"] == pytest.approx(a_all, rel=1e-8) and plain["num_fingers"] == 0
    k = int(fixed["num_fingers"])
    assert 2 <= k <= 9
    # the first clip (2, 3, ...) whose brute-force alpha is more than 1 below the unclipped one
    expect = next(c for c in range(2, 10) if _brute.clauset_fit(ev[:-c])[0] < a_all - 1)
    assert k == expect
    assert fixed["alpha"] == pytest.approx(_brute.clauset_fit(ev[:-k])[0], rel=1e-8)
    assert fixed["alpha"] < plain["alpha"] - 1
    assert fixed["xmax"] == pytest.approx(np.sort(ev)[-k - 1], rel=1e-8)


def _noise(seed, n=300, m=100):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pure_noise_has_no_spikes_thanks_to_the_tracy_widom_margin():
    """Without the TW margin the largest eigenvalue of a finite Gaussian matrix lands above the
    asymptotic MP edge in a good share of draws; with it, none of these 12 does."""
    sd = {f"n{i}.weight": _noise(i) for i in range(12)}
    df = frogwatch.analyze(sd, mp_fit=True, randomize=True, progress=False)
    above_edge = [(_brute.evals(W.numpy())[-1] > _brute.mp_edge(300, 100)) for W in sd.values()]
    assert sum(above_edge) >= 2  # the margin matters on these draws
    assert (df["num_spikes"] == 0).all()
    assert (df["rand_num_spikes"] == 0).all()


def test_a_planted_spike_stands_out_of_the_noise():
    W = _noise(0).numpy()
    u = np.linalg.qr(np.random.default_rng(0).standard_normal((300, 2)))[0]
    v = np.linalg.qr(np.random.default_rng(1).standard_normal((100, 2)))[0]
    # two rank-one signals well above the edge sqrt(lambda_+) = sqrt(300) + 10
    W = W + u @ np.diag([60.0, 45.0]) @ v.T
    row = frogwatch.analyze({"s.weight": torch.from_numpy(W)}, mp_fit=True, progress=False).iloc[0]
    assert row["num_spikes"] == 2
    assert row["bulk_max"] == pytest.approx(_brute.mp_edge(300, 100), rel=0.1)


def test_clip_xmax_keeps_the_fit_when_clipping_gains_less_than_one():
    rng = np.random.default_rng(7)
    base = np.sort(rng.pareto(2.4, 94) + 1)
    ev = np.concatenate([base, base[-1] * 2 * (1 + 0.1 * np.arange(6))])
    a_all = _brute.clauset_fit(ev)[0]
    gains = [a_all - _brute.clauset_fit(ev[:-c])[0] for c in range(2, 10)]
    assert 0 < max(gains) < 1  # some clip lowers alpha, none by more than 1
    W = torch.from_numpy(_brute.matrix_with_evals(ev, 200))
    row = frogwatch.analyze({"f.weight": W}, fix_fingers="clip_xmax", progress=False).iloc[0]
    assert row["num_fingers"] == 0
    assert row["alpha"] == pytest.approx(a_all, rel=1e-8)


def _brute_columns(W: np.ndarray) -> dict:
    ev = _brute.evals(W)
    alpha, xmin, D = _brute.clauset_fit(ev)
    x = ev[ev > 1e-5]
    n_tail = int(np.count_nonzero(x >= xmin))
    rank = int(np.linalg.matrix_rank(W))
    pos = ev[ev > 0]
    p = pos / ev.sum()
    sv = np.linalg.svd(W, compute_uv=False)
    return {
        "num_evals": ev.size, "alpha": alpha, "xmin": xmin, "xmax": ev[-1], "D": D,
        "sigma": (alpha - 1) / math.sqrt(n_tail), "num_pl_spikes": n_tail,
        "lambda_max": ev[-1], "spectral_norm": ev[-1], "norm": ev.sum(),
        "log_norm": math.log10(ev.sum()), "log_spectral_norm": math.log10(ev[-1]),
        "alpha_weighted": alpha * math.log10(ev[-1]),
        "log_alpha_norm": math.log10(np.sum(pos.astype(np.longdouble) ** alpha)),
        "stable_rank": ev.sum() / ev[-1], "entropy": -(p * np.log(p)).sum() / math.log(rank),
        "matrix_rank": rank, "rank_loss": ev.size - rank,
        "weak_rank_loss": int(np.count_nonzero(ev < 1e-6)),
        "sv_max": sv.max(), "sv_min": sv.min(),
    }


@pytest.mark.parametrize("case", ["gaussian", "heavy", "rank-deficient", "wide"])
def test_every_metric_column_against_brute_force(case):
    rng = np.random.default_rng(3)
    if case == "gaussian":
        W = rng.standard_normal((90, 40))
    elif case == "heavy":
        W = rng.standard_t(2.5, (120, 60)) * 0.3
    elif case == "rank-deficient":
        W = rng.standard_normal((80, 30)) @ np.diag([1.0] * 24 + [0.0] * 6)
    else:
        W = rng.standard_normal((35, 100)) * 4
    row = frogwatch.analyze({"w.weight": torch.from_numpy(W)}, progress=False).iloc[0]
    ref = _brute_columns(W)
    for col, v in ref.items():
        if col == "sv_min" and case == "rank-deficient":
            assert row[col] == pytest.approx(0.0, abs=1e-6)
            continue
        assert row[col] == pytest.approx(v, rel=1e-8, abs=1e-12), col
    assert row["status"] == "success" and row["reason"] == "" and row["num_fingers"] == 0
    assert math.isnan(row["Lambda"])
    expect_warning = "over-trained" if ref["alpha"] < 2 else "under-trained" if ref["alpha"] > 6 else ""
    assert row["warning"] == expect_warning
    if case == "rank-deficient":
        assert row["rank_loss"] == 6 and row["weak_rank_loss"] == 6


def test_failed_fit_keeps_norms_and_has_no_alpha_metrics():
    W = np.zeros((40, 30))
    W[0, 0] = 2.0  # one non-zero eigenvalue: nothing to fit
    row = frogwatch.analyze({"w.weight": torch.from_numpy(W)}, progress=False).iloc[0]
    assert row["status"] == "failed" and row["reason"]
    for col in ("alpha", "alpha_weighted", "log_alpha_norm", "xmin", "D", "entropy"):
        assert math.isnan(row[col]), col
    assert row["norm"] == 4.0 and row["lambda_max"] == 4.0 and row["stable_rank"] == 1.0
    assert row["log_norm"] == pytest.approx(math.log10(4.0))
    assert row["matrix_rank"] == 1 and row["rank_loss"] == 29 and row["weak_rank_loss"] == 29
    assert row["warning"] == ""
    zero = frogwatch.analyze({"z.weight": torch.zeros(40, 30)}, progress=False).iloc[0]
    assert zero["status"] == "failed" and zero["log_norm"] == -math.inf
    assert math.isnan(zero["stable_rank"]) and math.isnan(zero["entropy"])


@pytest.mark.parametrize("alpha, label", [(1.99, "over-trained"), (2.0, ""), (4.0, ""), (6.0, ""),
                                          (6.01, "under-trained"), (math.nan, ""), (math.inf, "")])
def test_quality_warning_thresholds(alpha, label):
    from frogwatch.metrics import quality_warning

    assert quality_warning(alpha) == label


# ---- layer_metrics on hand-built spectra and fits (edges found by benchmarks/mutation.py) --------


def _spec(ev, rank=None):
    from frogwatch.spectra import Spectrum

    ev = np.sort(np.asarray(ev, np.float64))
    r = int(np.count_nonzero(ev > 0)) if rank is None else rank
    sv = np.sqrt(ev) if ev.size else np.array([math.nan])
    return Spectrum(evals=ev, N=100, M=ev.size, rank=r, sv_max=float(sv.max()), sv_min=float(sv.min()))


def _fit(alpha, Lambda=math.nan):
    from frogwatch.powerlaw_fit import PowerLawFit

    return PowerLawFit(alpha, 0.1, 0.5, 0.05, 0.1, 10, Lambda=Lambda)


def test_metrics_of_a_spectrum_below_one():
    """Eigenvalues and their sum below 1 (a small-scale matrix): every column still from the formula."""
    from frogwatch.metrics import layer_metrics

    ev = np.array([0.02, 0.05, 0.1, 0.3, 0.5])
    row = layer_metrics(_spec(ev), _fit(2.5))
    p = ev / ev.sum()
    assert row["stable_rank"] == pytest.approx(ev.sum() / 0.5, rel=1e-12)
    assert row["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(5), rel=1e-12)
    assert row["log_alpha_norm"] == pytest.approx(math.log10((ev**2.5).sum()), rel=1e-12)
    assert row["log_norm"] == pytest.approx(math.log10(0.97), rel=1e-12)


def test_entropy_needs_rank_two_and_is_nan_without_warning_below():
    from frogwatch.metrics import layer_metrics

    ev = np.array([0.0, 0.0, 1.0, 3.0])  # rank 2
    assert layer_metrics(_spec(ev), _fit(3.0))["entropy"] == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2), rel=1e-12
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 / log(1) must not be computed
        row = layer_metrics(_spec(np.array([0.0, 0.0, 4.0])), _fit(3.0))
    assert math.isnan(row["entropy"]) and row["matrix_rank"] == 1


def test_weak_rank_loss_counts_eigenvalues_strictly_below_1e6():
    from frogwatch.metrics import layer_metrics

    ev = np.array([0.0, 5e-7, 1e-6, 2e-6, 1.0, 2.0])
    assert layer_metrics(_spec(ev), _fit(3.0))["weak_rank_loss"] == 2


def test_empty_spectrum_has_nan_lambda_max():
    from frogwatch.metrics import layer_metrics
    from frogwatch.powerlaw_fit import PowerLawFit

    row = layer_metrics(_spec(np.array([])), PowerLawFit.failed("too few"))
    assert row["num_evals"] == 0 and row["norm"] == 0.0 and row["log_norm"] == -math.inf
    assert math.isnan(row["lambda_max"]) and math.isnan(row["stable_rank"]) and math.isnan(row["entropy"])


@pytest.mark.parametrize(
    "alpha, Lambda, label",
    [(1.5, math.nan, "over-trained"), (7.0, math.nan, "under-trained"), (4.0, math.nan, ""),
     (1.5, 0.2, ""), (7.0, 0.2, "")],  # a TPL alpha gets no label (docs/method.md#tpl)
)
def test_warning_only_for_a_plain_power_law_fit(alpha, Lambda, label):
    from frogwatch.metrics import layer_metrics

    row = layer_metrics(_spec(np.linspace(0.1, 5, 30)), _fit(alpha, Lambda))
    assert row["warning"] == label
    assert row["alpha"] == alpha and (row["Lambda"] == Lambda or math.isnan(Lambda) and math.isnan(row["Lambda"]))
