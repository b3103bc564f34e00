"""The tail fit against the `powerlaw` package and WeightWatcher's small-N fitter."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from frogwatch.powerlaw_fit import fit_power_law
from frogwatch.sources import layer_matrices
from frogwatch.spectra import eigenvalues

powerlaw = pytest.importorskip("powerlaw")


def pl_reference(evals):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # powerlaw 2.0 caps alpha at 3 unless the range is lifted (docs/method.md#tpl)
        return powerlaw.Fit(evals[evals > 1e-5], xmax=None, verbose=False,
                            parameter_ranges={"alpha": [1, 100]})  # fmt: skip


@pytest.fixture(scope="module")
def real_spectra(minilm_session):
    mats = [m for m in layer_matrices(minilm_session) if m.M >= 10]
    # a spread of kinds: embeddings, attention, MLP and the pooler
    pick = [mats[i] for i in (0, 1, 2, 4, 6, 7, 30, 34, 38)]
    return {m.name: eigenvalues(m.load(), method="svd") for m in pick}


def test_alpha_and_xmin_match_powerlaw_on_real_spectra(real_spectra):
    for name, ev in real_spectra.items():
        ours = fit_power_law(ev)
        ref = pl_reference(ev)
        assert ours.status == "success", name
        assert ours.alpha == pytest.approx(ref.alpha, abs=1e-10), name
        assert ours.xmin == pytest.approx(ref.xmin, rel=1e-12), name
        assert ours.D == pytest.approx(ref.power_law.D, abs=1e-10), name
        assert ours.num_pl_spikes == int(np.sum(ev >= ours.xmin))
        assert ours.sigma == pytest.approx((ours.alpha - 1) / math.sqrt(ours.num_pl_spikes))


def test_synthetic_pareto_recovers_exponent():
    rng = np.random.default_rng(0)
    true_alpha = 2.5
    x = (1 - rng.random(4000)) ** (-1 / (true_alpha - 1))  # Pareto with xmin = 1
    fit = fit_power_law(x)
    ref = pl_reference(x)
    assert fit.alpha == pytest.approx(ref.alpha, abs=1e-10)
    assert fit.alpha == pytest.approx(true_alpha, abs=0.1)


def test_small_spectra_use_weightwatchers_bias_corrected_fit():
    ww_fit = pytest.importorskip("weightwatcher.WW_powerlaw")
    rng = np.random.default_rng(1)
    for n in (12, 15, 19):
        ev = np.sort(rng.pareto(2.0, n) + 0.5)
        ours = fit_power_law(ev)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ww_fit.WWFit(ev)
        assert ours.alpha == pytest.approx(ref.alpha, abs=1e-12)
        assert ours.xmin == pytest.approx(ref.xmin, rel=1e-12)
        assert ours.num_pl_spikes >= 8


def test_truncated_power_law_works(real_spectra):
    ev = real_spectra["encoder.layer.0.intermediate.dense"]
    tpl = fit_power_law(ev, fit="TPL")
    pl = fit_power_law(ev)
    assert tpl.status == "success"
    assert math.isfinite(tpl.alpha) and math.isfinite(tpl.Lambda) and tpl.Lambda >= 0
    assert tpl.xmin == pl.xmin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(ev[ev > 1e-5], xmin=pl.xmin, verbose=False).truncated_power_law
    assert tpl.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert tpl.Lambda == pytest.approx(ref.Lambda, rel=1e-9)


def test_xmax_cuts_the_fitted_range(real_spectra):
    ev = real_spectra["pooler.dense"]
    cut = np.sort(ev)[-5]
    fit = fit_power_law(ev, xmax=cut)
    ref = pl_reference(ev[ev <= cut])
    assert fit.xmax <= cut
    assert fit.alpha == pytest.approx(ref.alpha, abs=1e-10)


@pytest.mark.parametrize(
    "evals, why",
    [
        (np.array([]), "too few"),
        (np.full(50, 1e-9), "too few"),
        (np.array([1.0, 2.0, np.nan, 3.0] * 10), "NaN"),
        (np.ones(40), "degenerate"),
    ],
)
def test_failed_fits_are_nan_with_reason(evals, why):
    fit = fit_power_law(evals)
    assert fit.status == "failed"
    assert math.isnan(fit.alpha)
    assert why in fit.reason


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="fit must be"):
        fit_power_law(np.arange(1, 30.0), fit="lognormal")
    with pytest.raises(ValueError, match="fix_fingers"):
        fit_power_law(np.arange(1, 30.0), fix_fingers="xmin_peek")  # xmin_peak is supported (issue 15)


# ---- fix_fingers="xmin_peak" and esd_peak against powerlaw / numpy ---------------------------------


def brute_esd_peak(x, bins=100):
    """Left edge of the fullest of `bins` equal-width bins of log10(x) (first one on ties), by loops."""
    lx = np.log10(np.asarray(x, np.float64))
    lo, hi = lx.min(), lx.max()
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in lx:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return 10 ** (lo + width * counts.index(max(counts)))


def xmin_peak_reference(ev):
    """powerlaw.Fit with WeightWatcher's xmin range (log10(0.95 peak), 1.5 peak)."""
    x = np.sort(ev[ev > 1e-5])
    peak = brute_esd_peak(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(x, xmin=(math.log10(0.95 * peak), 1.5 * peak), xmax=None, verbose=False,
                            parameter_ranges={"alpha": [1, 1000]})  # fmt: skip


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 1.0), (2, 1000.0)])
def test_xmin_peak_matches_powerlaw_with_the_capped_xmin_range(seed, scale):
    rng = np.random.default_rng(seed)
    # a gamma bulk (peak near 0.6) and a Pareto tail from 5: the plain fit takes the tail
    ev = scale * np.concatenate([rng.gamma(4, 0.25, 300), 5 * (1 + rng.pareto(2.0, 60))])
    ours = fit_power_law(ev, fix_fingers="xmin_peak")
    ref = xmin_peak_reference(ev)
    assert ours.status == "success" and ours.num_fingers == 0
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert ours.xmin == pytest.approx(ref.xmin, rel=1e-12)
    assert ours.D == pytest.approx(ref.power_law.D, rel=1e-9)
    assert ours.num_pl_spikes == int(np.sum(ev >= ref.xmin))
    assert ours.xmax == ev.max()
    assert ours.sigma == pytest.approx((ours.alpha - 1) / math.sqrt(ours.num_pl_spikes), rel=1e-12)
    plain = fit_power_law(ev)
    assert ours.xmin < 1.5 * brute_esd_peak(ev) < plain.xmin  # the cap changes the fit here


def test_xmin_peak_caps_xmin_just_above_one_and_a_half_peaks():
    rng = np.random.default_rng(0)
    # a narrow bulk at 1 and a tail from 2: the plain fit's xmin is 2.07 x the peak, above the cap
    ev = np.concatenate([np.exp(0.05 * rng.standard_normal(300)), 2 * (1 + rng.pareto(1.5, 150))])
    peak = brute_esd_peak(ev)
    assert 1.5 * peak < fit_power_law(ev).xmin < 2.5 * peak
    ours, ref = fit_power_law(ev, fix_fingers="xmin_peak"), xmin_peak_reference(ev)
    assert ours.xmin == pytest.approx(ref.xmin, rel=1e-12) and ours.xmin < 1.5 * peak
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-10)


def test_xmin_peak_with_exactly_two_candidates():
    # distinct values below 1.5 x peak (= 1.0): 1.0, 1.2, 1.3; the largest is dropped, two remain
    ev = np.array([1.0] * 30 + [1.2] * 30 + [1.3, 5.0, 50.0, 500.0])
    ours, ref = fit_power_law(ev, fix_fingers="xmin_peak"), xmin_peak_reference(ev)
    assert ours.status == "success" and ours.xmin == ref.xmin == 1.0
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-10)


def test_esd_peak_is_the_left_edge_of_the_fullest_log_bin():
    from frogwatch.powerlaw_fit import esd_peak

    rng = np.random.default_rng(5)
    for x in (rng.gamma(4, 0.25, 500), np.exp(rng.standard_normal(300)) * 50, np.array([1.0, 2.0, 2.0, 3.0, 10.0])):
        x = np.sort(x)
        assert esd_peak(x) == pytest.approx(brute_esd_peak(x), rel=1e-12)
        assert esd_peak(x, bins=7) == pytest.approx(brute_esd_peak(x, bins=7), rel=1e-12)


@pytest.mark.parametrize(
    "evals, why",
    [
        (np.array([1.0, 2.0]), "too few eigenvalues above 1e-05 (2)"),
        (np.array([1.0, 1.0, 1.0, 5.0, 9.0]), "xmin_peak: fewer than 2 candidate xmin below 1.5 x peak"),
        (np.full(30, 2.0), "xmin_peak: fewer than 2 candidate xmin"),
        (np.array([1.0, 1.1, 5.0]), "xmin_peak: fewer than 2 candidate xmin"),
    ],
)
def test_xmin_peak_failures_say_why(evals, why):
    fit = fit_power_law(evals, fix_fingers="xmin_peak")
    assert fit.status == "failed" and why in fit.reason
    assert math.isnan(fit.alpha) and math.isnan(fit.xmin) and fit.num_pl_spikes == 0


# ---- fit="TPL", clip_xmax stopping rules, failed fits -----------------------------------------------


def tpl_reference(x, xmin):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(x, xmin=xmin, xmax=None, verbose=False,
                            parameter_ranges={"alpha": [0.0, 100.0]}).truncated_power_law  # fmt: skip


@pytest.mark.parametrize("tail_shape", [2.0, 3.5])
def test_tpl_fits_above_the_power_law_xmin(tail_shape):
    rng = np.random.default_rng(0)
    # a Pareto tail from 5 above a gamma bulk peaking near 0.6; with tail_shape 3.5 the TPL alpha
    # is above 3, where powerlaw's default range would cap it
    ev = np.concatenate([rng.gamma(4, 0.25, 300), 5 * (1 + rng.pareto(tail_shape, 200))])
    xmins = []
    for fix in (None, "xmin_peak"):
        pl = fit_power_law(ev, fix_fingers=fix)
        tpl = fit_power_law(ev, fit="TPL", fix_fingers=fix)
        ref = tpl_reference(np.sort(ev), pl.xmin)
        assert tpl.status == "success", fix
        assert (tpl.xmin, tpl.xmax, tpl.num_pl_spikes) == (pl.xmin, pl.xmax, pl.num_pl_spikes)
        assert tpl.alpha == pytest.approx(ref.alpha, rel=1e-9) and tpl.Lambda == pytest.approx(ref.Lambda, rel=1e-9)
        assert tpl.D == pytest.approx(ref.D, rel=1e-9)
        assert tpl.sigma == pytest.approx((tpl.alpha - 1) / math.sqrt(pl.num_pl_spikes), rel=1e-12)
        xmins.append(pl.xmin)
    if tail_shape == 2.0:
        assert xmins[1] < xmins[0]  # xmin_peak's TPL starts at its own, lower xmin
    else:
        assert fit_power_law(ev, fit="TPL").alpha > 3


def test_tpl_after_clip_xmax_fits_without_the_fingers():
    import _brute

    ev = _brute.finger_spectrum()
    pl = fit_power_law(ev, fix_fingers="clip_xmax")
    k = pl.num_fingers
    assert k >= 2
    tpl = fit_power_law(ev, fit="TPL", fix_fingers="clip_xmax")
    ref = tpl_reference(np.sort(ev)[:-k], pl.xmin)
    assert tpl.alpha == pytest.approx(ref.alpha, rel=1e-9) and tpl.xmax == pl.xmax


def test_tpl_failures_are_failed_rows_with_the_cause(monkeypatch):
    ev = np.random.default_rng(0).pareto(2.0, 200) + 1
    monkeypatch.setitem(__import__("sys").modules, "powerlaw", None)  # not installed
    fit = fit_power_law(ev, fit="TPL")
    assert fit.status == "failed" and fit.reason == "fit='TPL' needs the powerlaw package"
    monkeypatch.undo()

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("optimiser blew up")

    monkeypatch.setattr(powerlaw, "Fit", Broken)
    fit = fit_power_law(ev, fit="TPL")
    assert fit.status == "failed" and fit.reason == "truncated power-law fit failed: RuntimeError: optimiser blew up"
    for a, lam in [(2.0, math.nan), (math.nan, 0.1), (math.inf, 0.1)]:

        class NoConvergence:
            def __init__(self, *args, **kwargs):
                self.truncated_power_law = type("T", (), {"alpha": a, "Lambda": lam, "D": 0.1})()

        monkeypatch.setattr(powerlaw, "Fit", NoConvergence)
        fit = fit_power_law(ev, fit="TPL")
        assert fit.status == "failed" and fit.reason == "truncated power-law fit did not converge", (a, lam)


def test_clip_xmax_keeps_the_first_fit_when_a_clip_is_degenerate_or_alpha_falls_to_two():
    import _brute

    ev = np.array([1.0] * 20 + [5.0, 9.0])  # clipping the top two leaves a constant spectrum
    assert fit_power_law(ev, fix_fingers="clip_xmax") == fit_power_law(ev)
    heavy = np.sort(np.random.default_rng(1).pareto(0.8, 40) + 1)
    a_all, a_2 = _brute.clauset_fit(heavy)[0], _brute.clauset_fit(heavy[:-2])[0]
    assert a_2 <= 2.0 and a_all - a_2 < 1.0  # the search stops at the first clip
    fit = fit_power_law(heavy, fix_fingers="clip_xmax")
    assert fit.num_fingers == 0 and fit.alpha == pytest.approx(a_all, rel=1e-9)
    small = np.sort(np.random.default_rng(3).pareto(2.0, 12) + 1)  # clips stop at 8 eigenvalues left
    assert fit_power_law(small, fix_fingers="clip_xmax").num_fingers == 0


def test_clip_xmax_needs_a_gain_of_more_than_finger_thresh():
    import _brute

    ev = _brute.finger_spectrum()
    k = fit_power_law(ev, fix_fingers="clip_xmax").num_fingers
    first, clipped = fit_power_law(ev), fit_power_law(ev[np.argsort(ev)][:-k])
    gain = first.alpha - clipped.alpha
    assert clipped.alpha + gain == first.alpha  # the gain is representable exactly
    assert fit_power_law(ev, fix_fingers="clip_xmax", finger_thresh=gain).num_fingers != k
    assert fit_power_law(ev, fix_fingers="clip_xmax", finger_thresh=gain * (1 - 1e-9)).num_fingers == k


def test_tied_tail_values_fit_without_runtime_warnings():
    ev = np.concatenate([np.random.default_rng(0).pareto(2.0, 50) + 1, [40.0, 40.0]])  # last tail: log sum 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_power_law(ev).status == "success"


def test_failed_fit_fields_and_reasons():
    # n >= 20: a constant spectrum has no xmin to choose (powerlaw needs 4 distinct values)
    fit = fit_power_law(np.ones(40))
    assert fit.status == "failed" and fit.num_pl_spikes == 0 and fit.num_fingers == 0
    assert fit.reason == "degenerate spectrum: fewer than 4 distinct eigenvalues above 1e-05 (1)"
    for field in ("alpha", "xmin", "xmax", "D", "sigma", "Lambda"):
        assert math.isnan(getattr(fit, field)), field
    # n < 20 (bias-corrected fit): no candidate tail qualifies at all
    assert fit_power_law(np.ones(12)).reason == "no candidate tail gives a valid power law (degenerate spectrum)"


# ---- small-N and input edges --------------------------------------------------------------------


def _ww_fit(ev):
    import contextlib
    import io

    ww_fit = pytest.importorskip("weightwatcher.WW_powerlaw")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return ww_fit.WWFit(ev)


@pytest.mark.parametrize(
    "ev",
    [
        np.sort(np.random.default_rng(0).pareto(2.0, 15) + 0.5),  # the best tail has exactly 8 values
        np.array([0.5, 0.7, 0.9, 1.2, 1.5] + [3.0] * 9),  # a tied top block: its tails have alpha = inf
    ],
)
def test_small_spectra_edges_match_weightwatcher(ev):
    ours, ref = fit_power_law(ev), _ww_fit(ev)
    assert ours.status == "success"
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-12) and ours.xmin == pytest.approx(ref.xmin, rel=1e-12)


def test_eight_eigenvalues_have_one_candidate_tail():
    ev = np.array([1.0, 1.3, 1.7, 2.2, 3.1, 4.0, 6.5, 11.0])
    fit = fit_power_law(ev)
    # bias-corrected MLE of the whole spectrum: 1 + (n - 1) / Σ log(x / xmin)
    assert fit.status == "success" and fit.xmin == 1.0 and fit.num_pl_spikes == 8
    assert fit.alpha == pytest.approx(1 + 7 / np.log(ev).sum(), rel=1e-12)
    few = fit_power_law(ev[:5])
    assert few.status == "failed" and few.reason == "too few eigenvalues above 1e-05 (5)"


def test_twenty_eigenvalues_use_the_plain_estimator():
    ev = np.sort(np.random.default_rng(4).pareto(2.0, 20) + 1)
    ours, ref = fit_power_law(ev), pl_reference(ev)
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-10) and ours.xmin == pytest.approx(ref.xmin, rel=1e-12)


def test_tightly_clustered_spectrum_matches_the_brute_force_fit():
    # all log-ratios small: every candidate's Σ log(x / xmin) is below 1
    import _brute

    ev = np.sort(1 + 0.002 * np.random.default_rng(5).pareto(2.0, 60))
    ours, (alpha, xmin, D) = fit_power_law(ev), _brute.clauset_fit(ev)  # alpha ~ 800: beyond powerlaw's range
    assert ours.alpha == pytest.approx(alpha, rel=1e-9) and ours.xmin == xmin and ours.D == pytest.approx(D, rel=1e-9)


def test_input_forms_and_threshold():
    ev = np.sort(np.random.default_rng(6).pareto(2.0, 80) + 1)
    ref = fit_power_law(ev)
    assert fit_power_law(ev.astype(np.float32).astype(np.float64)) == fit_power_law(ev.astype(np.float32))
    assert fit_power_law(list(ev[::-1])) == ref  # any order, any sequence
    assert fit_power_law(np.concatenate([ev, [1e-5, 1e-7, 0.0]])) == ref  # at or below 1e-5: dropped
    assert fit_power_law(ev, fit="power_law") == ref
    assert fit_power_law(ev, fit="truncated_power_law") == fit_power_law(ev, fit="tpl")
    bad = fit_power_law(np.append(ev, np.inf))
    assert bad.status == "failed" and bad.reason == "eigenvalues contain NaN or Inf"
