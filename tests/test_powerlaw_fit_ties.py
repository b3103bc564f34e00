"""The tail fit on spectra with exactly tied eigenvalues, against `powerlaw` and WeightWatcher.

``powerlaw.Fit`` takes xmin among the distinct values, the tail as every value >= xmin, and the KS
distance at the distinct values (docs/method.md#alpha). A spectrum of trained weights has no exact
ties, but a constant or repeated block (pruned, quantised or tied weights) does.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from frogwatch.powerlaw_fit import fit_power_law

powerlaw = pytest.importorskip("powerlaw")

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def pl_reference(ev: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(ev[ev > 1e-5], xmax=None, verbose=False, parameter_ranges={"alpha": [1, 100]})


def assert_matches_powerlaw(ev: np.ndarray) -> None:
    ours, ref = fit_power_law(ev), pl_reference(ev)
    assert ours.status == "success"
    assert ours.xmin == ref.xmin
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert ours.D == pytest.approx(ref.power_law.D, rel=1e-9, abs=1e-12)
    assert ours.num_pl_spikes == int(np.sum(ev >= ours.xmin))  # the whole run of ties at xmin
    assert ours.sigma == pytest.approx((ours.alpha - 1) / math.sqrt(ours.num_pl_spikes), rel=1e-12)


def test_runs_of_ties_below_the_tail_give_powerlaws_alpha():
    # the example of BENCHMARKS.md §6: xmin used to land inside the run of 1s (31 of 35 values >= 1)
    ev = np.array([1.0] * 10 + [2.0] * 10 + list(np.linspace(2.5, 30, 15)))
    assert_matches_powerlaw(ev)
    assert fit_power_law(ev).num_pl_spikes == 35


@st.composite
def tied_spectra(draw):
    """A Pareto-like spectrum (n >= 20) with runs of exactly equal values planted in it."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(20, 160))
    rng = np.random.default_rng(seed)
    shape = draw(st.sampled_from([1.0, 1.5, 2.5]))
    x = np.sort(rng.pareto(shape, n) + 1.0) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    # plant ties: copy chosen values over the next few positions, or round everything to a grid
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, n - 2))
            x[i : i + draw(st.integers(2, 12))] = x[i]
    else:
        x = np.round(x / x[0], draw(st.integers(0, 2))) * x[0]
        x = x[x > 0]
    x = np.sort(x)
    # enough distinct values for powerlaw to scan, and no near-degenerate top tail where the
    # reference's alpha cap of 100 (not ours) would decide
    assume(np.unique(x).size >= 4 and np.log(x[-1] / np.unique(x)[-2]) > 0.05)
    return rng.permutation(x)


@SETTINGS
@given(tied_spectra())
def test_tied_spectra_match_powerlaw(ev):
    assert np.unique(ev).size < ev.size  # there are ties
    assert_matches_powerlaw(ev)


def test_untied_spectra_are_unchanged_by_the_tie_handling():
    # a spectrum whose values are all distinct: every position is a candidate, as before
    ev = np.sort(np.random.default_rng(3).pareto(2.0, 300) + 1)
    assert np.unique(ev).size == ev.size
    assert_matches_powerlaw(ev)


def test_xmin_peak_on_tied_spectra_matches_powerlaw_with_the_capped_range():
    from frogwatch.powerlaw_fit import esd_peak

    rng = np.random.default_rng(7)
    ev = np.sort(np.concatenate([rng.lognormal(0, 0.3, 200), [0.9] * 15, [1.1] * 15, rng.pareto(2, 40) + 2]))
    peak = esd_peak(ev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(ev, xmin=(math.log10(0.95 * peak), 1.5 * peak), xmax=None, verbose=False,
                           parameter_ranges={"alpha": [1, 100]})  # fmt: skip
    ours = fit_power_law(ev, fix_fingers="xmin_peak")
    assert ours.xmin == ref.xmin and ours.alpha == pytest.approx(ref.alpha, rel=1e-10)
    assert ours.D == pytest.approx(ref.power_law.D, rel=1e-9)


def _ww_fit(ev):
    ww_fit = pytest.importorskip("weightwatcher.WW_powerlaw")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return ww_fit.WWFit(ev)


@pytest.mark.parametrize("seed", range(6))
def test_small_spectra_with_ties_match_weightwatchers_small_n_fit(seed):
    # n < 20: WeightWatcher's own fitter scans every position, ties included; so does ours
    rng = np.random.default_rng(seed)
    ev = np.sort(rng.pareto(2.0, 17) + 0.5)
    ev[2:6] = ev[2]
    ev[9:12] = ev[9]
    ours, ref = fit_power_law(ev), _ww_fit(ev)
    assert ours.status == "success"
    assert ours.alpha == pytest.approx(ref.alpha, rel=1e-12)
    assert ours.xmin == pytest.approx(ref.xmin, rel=1e-12)
    assert ours.D == pytest.approx(ref.D, rel=1e-12)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_fewer_than_four_distinct_values_fail_as_powerlaw_does(levels):
    # powerlaw scans the distinct values below the two largest and needs 2 of them to choose from
    ev = np.repeat(1.3 * np.arange(1.0, levels + 1), 25)
    fit = fit_power_law(ev)
    assert fit.status == "failed"
    assert fit.reason == f"degenerate spectrum: fewer than 4 distinct eigenvalues above 1e-05 ({levels})"
    assert math.isnan(pl_reference(ev).alpha)
    four = np.repeat([1.3, 2.6, 3.9, 5.2], [12, 6, 3, 1])
    assert_matches_powerlaw(four)  # the smallest spectrum powerlaw fits: two candidates
