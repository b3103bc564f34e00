"""Figures tell the truth: what is plotted equals what the table says."""

from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import frogwatch
from frogwatch._format import fmt_fixed, fmt_number
from frogwatch.plots import plot_alpha_depth, plot_compare, plot_esd, plot_randomized_esd
from frogwatch.powerlaw_fit import fit_power_law


@pytest.fixture
def mlp_file(tmp_path, mlp):
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
    return path


def _tail_count(fig) -> int:
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    m = [re.search(r"\((\d+) in tail\)", t) for t in texts]
    return int(next(x for x in m if x).group(1))


def _bars(ax):
    return np.array([p.get_height() for p in ax.patches])


def test_plot_esd_of_a_table_row_matches_the_table(minilm_session, minilm_df):
    """plot_esd(df.iloc[i]) works and shows the table's alpha and tail count for every layer."""
    df = minilm_df
    for i in (0, 2, 4, 6, 13, 22, 31, 38):  # a spread of kinds; each recomputes one spectrum
        row = df.iloc[i]
        fig = plot_esd(row)
        assert _tail_count(fig) == int(row["num_pl_spikes"]), row["name"]
        legend = " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        assert f"= {row['alpha']:.2f}" in legend
        assert fig.axes[0].get_title() == row["name"]


def test_plot_esd_row_from_a_file_and_the_errors(mlp, mlp_file):
    df = frogwatch.analyze(str(mlp_file), progress=False)
    fig = plot_esd(df.iloc[1])  # the table remembers the path
    assert _tail_count(fig) == int(df.iloc[1]["num_pl_spikes"])
    df_sd = frogwatch.analyze(mlp.state_dict(), progress=False)
    assert _tail_count(plot_esd(df_sd.iloc[0])) == int(df_sd.iloc[0]["num_pl_spikes"])
    lost = pickle.loads(pickle.dumps(df_sd))  # a pickled table does not carry the model
    with pytest.raises(ValueError, match=r"plot_esd\(row, model=model\)"):
        plot_esd(lost.iloc[0])
    fig = plot_esd(lost.iloc[0], model=mlp.state_dict())
    assert _tail_count(fig) == int(df_sd.iloc[0]["num_pl_spikes"])


def test_unpooled_conv_slice_row(convnet):
    df = frogwatch.analyze(convnet, pool=False, progress=False)
    ok = df[df["name"].str.endswith("[1,2]") & (df["status"] == "success")]
    row = ok.iloc[-1]
    fig = plot_esd(row)
    assert _tail_count(fig) == int(row["num_pl_spikes"])
    assert fig.axes[0].patches  # a histogram of that slice's M eigenvalues


def test_esd_density_is_per_decade_not_inflated_by_tiny_bins():
    """A few tiny eigenvalues must not make the tallest bars (density of log10 lambda)."""
    rng = np.random.default_rng(0)
    ev = np.concatenate([rng.uniform(1.0, 10.0, 500), [1e-4, 2e-4, 3e-4]])
    fig = plot_esd(ev, bins=40)
    ax = fig.axes[0]
    heights = _bars(ax)
    edges = np.array([p.get_x() for p in ax.patches] + [ax.patches[-1].get_x() + ax.patches[-1].get_width()])
    counts, _ = np.histogram(ev, bins=edges)
    expected = counts / (ev.size * np.diff(np.log10(edges)))
    assert heights == pytest.approx(expected, rel=1e-9)
    assert (heights * np.diff(np.log10(edges))).sum() == pytest.approx(1.0)
    assert int(np.argmax(heights)) > len(heights) // 2  # the bulk, not the three tiny ones
    assert "density of" in ax.get_ylabel()


def test_esd_power_law_line_is_the_fit():
    rng = np.random.default_rng(1)
    ev = (1 - rng.random(3000)) ** (-1 / 1.8)
    fit = fit_power_law(ev)
    fig = plot_esd(ev, fit)
    line = fig.axes[0].get_lines()[0]
    xs, ys = line.get_xdata(), line.get_ydata()
    frac = fit.num_pl_spikes / ev.size
    want = frac * (fit.alpha - 1) / fit.xmin * (xs / fit.xmin) ** (-fit.alpha) * xs * math.log(10)
    assert ys == pytest.approx(want, rel=1e-12)


def test_randomized_esd_is_per_decade(minilm_session):
    W = minilm_session.encoder.layer[0].attention.self.query.weight
    fig = plot_randomized_esd(W, name="q")
    for ax in fig.axes[:2]:
        assert "density of" in fig.axes[0].get_ylabel()
        edges = [p.get_width() for p in ax.patches]
        assert len(edges) > 0


def test_alpha_depth_says_which_order(mlp, mlp_file):
    fig = plot_alpha_depth(frogwatch.analyze(str(mlp_file), progress=False))
    assert "natural name order" in fig.axes[0].get_xlabel()
    fig = plot_alpha_depth(frogwatch.analyze(mlp, progress=False))
    assert "module order" in fig.axes[0].get_xlabel()


def _cmp(scale_change: np.ndarray, collapse=None) -> pd.DataFrame:
    n = len(scale_change)
    return pd.DataFrame({
        "name": [f"layer.{i}.dense" for i in range(n)],
        "alpha_base": np.linspace(3, 4, n), "alpha_tuned": np.linspace(3.1, 4.1, n),
        "log_spectral_norm_change": scale_change,
        "scale_collapse": collapse if collapse is not None else np.zeros(n, bool),
    })  # fmt: skip


def test_compare_delta_panel_is_visible_at_real_scales():
    dl = np.array([1e-4, -2e-4, 5e-5, 0.0, -1e-5])
    fig = plot_compare(_cmp(dl), base_label="base BertModel (m)", tuned_label="tuned BertModel (m)")
    ax2 = fig.axes[1]
    assert _bars(ax2) == pytest.approx(dl)  # the bars are the table's numbers
    lo, hi = ax2.get_ylim()
    assert hi - lo < 1e-3  # scaled to the data, not to the -0.3 threshold
    assert any("off this scale" in t.get_text() for t in ax2.texts)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["base BertModel (m)", "tuned BertModel (m)"]
    # a real collapse: the threshold line is drawn and the bar is red
    fig = plot_compare(_cmp(np.array([-0.5, 0.01, 0.0]), np.array([True, False, False])))
    ax2 = fig.axes[1]
    assert ax2.get_ylim()[0] <= -0.5
    assert any(np.allclose(line.get_ydata(), -0.3) for line in ax2.get_lines())


def test_report_labels_tell_models_apart(mlp):
    from frogwatch.html_report import model_labels

    b, t = model_labels(mlp, mlp)
    assert b != t and b.startswith("base") and t.startswith("tuned")
    assert model_labels("a.safetensors", "b.safetensors") == ("a.safetensors", "b.safetensors")


def test_no_negative_zero():
    assert fmt_fixed(-0.0) == "0" and fmt_fixed(0.0) == "0"
    assert fmt_fixed(-1e-9) == "0.0000"
    assert fmt_fixed(-0.5, 2) == "-0.50"
    assert fmt_number(-0.0) == "0" and fmt_number(np.float64(-1e-12)) == "-1e-12"
    assert fmt_number(np.nan) == "" and fmt_number(np.int64(3)) == "3"


def test_print_flow_is_short(minilm_session, minilm_df):
    flow = frogwatch.correlation_flow(minilm_df, minilm_session)
    text = str(flow)
    assert text.splitlines()[0].startswith(f"CorrelationFlow: {flow.verdict}")
    assert len(text.splitlines()) <= len(flow.groups) + 4
    assert repr(flow) == text and "DataFrame" not in text


def test_summary_counts_are_ints(minilm_df):
    s = frogwatch.summary(minilm_df)
    assert type(s["num_layers"]) is int and type(s["num_failed"]) is int
    assert s["num_layers"] == 37 and isinstance(s["alpha"], float)  # 39 minus the 2 embeddings


def test_frog_chart_titles_and_labels(mlp):
    from frogwatch.plots_frog import plot_importance, plot_strategy_comparison

    plain = frogwatch.select(mlp, 0.05, progress=False)
    fig = plot_importance(plain)
    title = fig.axes[0].get_title()
    assert "no α blend" in title and "undertrained" not in title and "5 %" in title
    blended = frogwatch.select(mlp, 0.05, blend=0.5, alpha={"0": 2.0, "2": 4.0, "4": 6.0}, progress=False)
    assert "α blend 0.5 (undertrained-first)" in plot_importance(blended).axes[0].get_title()
    gl = frogwatch.select(mlp, 0.05, strategy="global", blend=0.5, alpha={"0": 2.0, "2": 4.0, "4": 6.0},
                          progress=False)  # fmt: skip
    fig = plot_strategy_comparison(blended, gl)
    texts = [fig.axes[0].get_title()] + [ax.get_ylabel() for ax in fig.axes]
    assert "α blend 0.5" in texts[0]
    assert not any("§" in t for t in texts)


def test_tpl_alpha_is_not_capped_and_not_labelled():
    import warnings

    powerlaw = pytest.importorskip("powerlaw")
    rng = np.random.default_rng(2)
    x = (1 - rng.random(5000)) ** (-1 / 3.5)  # Pareto with alpha = 4.5: no cut-off
    fit = fit_power_law(x, fit="TPL")
    assert fit.alpha > 4.0  # powerlaw's default search range would stop at 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(x, xmin=fit.xmin, xmax=None, verbose=False,
                           parameter_ranges={"alpha": [0, 100]}).truncated_power_law  # fmt: skip
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-9)
    torch.manual_seed(0)
    df = frogwatch.analyze(nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 100)), fit="TPL", progress=False)
    assert (df["warning"] == "").all() and not df["overparameterized"].any()


def test_tail_count_is_the_tables_even_when_recomputed_eigenvalues_differ_in_the_last_bit():
    """Eigenvalues recomputed in another thread layout can sit a hair below the table's xmin;
    the figure must still show the table's num_pl_spikes (the 20-vs-21 bug)."""
    rng = np.random.default_rng(3)
    ev = np.sort((1 - rng.random(400)) ** (-1 / 2.0))
    fit = fit_power_law(ev)
    k = fit.num_pl_spikes
    row = pd.Series({"alpha": fit.alpha, "xmin": ev[-k] * (1 + 1e-13), "D": fit.D, "num_pl_spikes": k,
                     "status": "success"})  # fmt: skip
    assert (ev >= row["xmin"]).sum() == k - 1  # a plain comparison would lose one eigenvalue
    assert _tail_count(plot_esd(ev, row)) == k
