"""Figures (non-empty PNG/SVG files) and the HTML report, rendered in headless Chromium."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from frogwatch.cli import main
from frogwatch.diagnostics import compare, layer_spectrum
from frogwatch.plots import plot_alpha_depth, plot_compare, plot_esd, plot_randomized_esd
from frogwatch.powerlaw_fit import fit_power_law
from frogwatch.html_report import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYER = "encoder.layer.0.output.dense"
PLANT_SCALE = "encoder.layer.2.attention.output.dense"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png_ok(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))


def test_plot_esd_from_a_spectrum_and_a_table_row(minilm_session, minilm_df, tmp_path):
    spec = layer_spectrum(minilm_session, LAYER)
    row = minilm_df.set_index("name").loc[LAYER]
    fig = plot_esd(spec, row, title=LAYER, path=tmp_path / "esd.png")
    _png_ok(tmp_path / "esd.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    # the xmin line sits at the table's xmin, and the legend quotes the fitted alpha
    xs = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert xs == [pytest.approx(row["xmin"])]
    assert any(f"{row['alpha']:.2f}" in t.get_text() for t in ax.get_legend().get_texts())
    # raw eigenvalues and a PowerLawFit work too, as does SVG
    plot_esd(spec.evals, fit_power_law(spec.evals), path=tmp_path / "esd.svg")
    assert b"<svg" in (tmp_path / "esd.svg").read_bytes()[:2000]


def test_plot_alpha_depth(minilm_df, tmp_path):
    fig = plot_alpha_depth(minilm_df, path=tmp_path / "depth.png")
    _png_ok(tmp_path / "depth.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for kind in ["query", "key", "value", "attn_out", "mlp_up", "mlp_down"]:
        assert kind in labels
    # 37 non-embedding layers plotted, the 2 and 6 lines drawn
    n_points = sum(len(c.get_offsets()) for c in ax.collections if c.get_label() in labels[:7])
    assert n_points == 37
    assert {2.0, 6.0} <= {ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"}


def test_plot_randomized_esd_shows_the_traps(minilm_session, tmp_path):
    W = minilm_session.get_submodule(LAYER).weight
    fig = plot_randomized_esd(W, seed=0, name=LAYER, path=tmp_path / "rand.png")
    _png_ok(tmp_path / "rand.png")
    assert len(fig.axes) == 2
    assert "trap" in fig.axes[1].get_title()
    assert not fig.axes[1].get_title().startswith("W with entries shuffled: 0")


def test_plot_compare(minilm_session, tmp_path):
    m = copy.deepcopy(minilm_session)
    with torch.no_grad():
        m.get_submodule(PLANT_SCALE).weight.mul_(0.1)
    cmp = compare(minilm_session, m, layers=[r"encoder\.layer\.[0-3]\..*"])
    fig = plot_compare(cmp, path=tmp_path / "cmp.png")
    _png_ok(tmp_path / "cmp.png")
    bars = fig.axes[1].patches
    assert len(bars) == len(cmp) == 24
    red = [i for i, b in enumerate(bars) if b.get_facecolor()[:3] != bars[0].get_facecolor()[:3]]
    assert [cmp["name"].iloc[i] for i in red] == [PLANT_SCALE]


def test_plots_reject_bad_input(minilm_df, tmp_path):
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        plot_alpha_depth(minilm_df, path=tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ValueError):
        plot_esd(np.ones((2, 2, 2)))
    with pytest.raises(ValueError):
        plot_randomized_esd(np.zeros(5))
    with pytest.raises(ValueError):
        plot_compare(minilm_df)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_dir(minilm_session, tmp_path_factory):
    tuned = copy.deepcopy(minilm_session)
    with torch.no_grad():
        tuned.get_submodule(PLANT_SCALE).weight.mul_(0.1)
    out = tmp_path_factory.mktemp("report")
    path = report(tuned, base=minilm_session, out_dir=out)
    assert path == out / "index.html"
    return out


def test_report_files_and_content(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert names == {"index.html", "layers.csv", "summary.csv", "flow.csv", "flow_pairs.csv",
                     "compare.csv", "compare_summary.csv"}  # fmt: skip
    page = (report_dir / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    # self-contained: every image is embedded, nothing is fetched
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:") for s in srcs)
    assert page.count('src="data:image/png;base64,') >= 5  # depth, 2 ESDs, traps, compare
    assert "<script" not in page
    for section in ["Findings", "Summary", "Correlation flow", "Figures", "Before / after", "Layers"]:
        assert f">{section}</h2>" in page
    assert f"scale-collapsed</span> layer(s): {PLANT_SCALE}" in page
    layers = pd.read_csv(report_dir / "layers.csv")
    assert len(layers) == 39 and "rand_num_spikes" in layers and "num_spikes" in layers
    cmp = pd.read_csv(report_dir / "compare.csv")
    assert cmp.loc[cmp["scale_collapse"], "name"].tolist() == [PLANT_SCALE]
    assert not list(report_dir.glob(".*.tmp"))  # no temporary file left behind


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", "--enable-logging=stderr", "--v=0",
           *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package: chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    page = report_dir / "index.html"
    res = _chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Correlation flow" in res.stdout and res.stdout.count("<img") >= 5
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], console
    # A probe copy of the page reports through the console: this proves console messages are
    # captured, and that every embedded PNG decodes (naturalWidth > 0) in the browser.
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
              "const bad=im.filter(i=>!(i.complete&&i.naturalWidth>0)).length;"
              "console.log('FROGWATCH_IMAGES '+im.length+' broken '+bad);});</script>")  # fmt: skip
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    res = _chromium(["--dump-dom", probe.as_uri()], tmp_path)
    msgs = re.findall(r"FROGWATCH_IMAGES (\d+) broken (\d+)", res.stderr)
    assert msgs, res.stderr[-2000:]
    n, broken = map(int, msgs[0])
    assert n >= 5 and broken == 0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(3):
            blk = nn.Module()
            blk.up_proj = nn.Linear(48, 144, bias=False)
            blk.down_proj = nn.Linear(144, 48, bias=False)
            self.layers.append(blk)


def test_cli_report_with_base(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in _Tiny().state_dict().items()}
    save_file(sd, str(tmp_path / "base.safetensors"))
    sd["layers.1.up_proj.weight"] = sd["layers.1.up_proj.weight"] + 0.01
    save_file(sd, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "rep"
    rc = main(["report", str(tmp_path / "tuned.safetensors"), "--base", str(tmp_path / "base.safetensors"),
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out
    cmp = pd.read_csv(out / "compare.csv")
    assert (cmp["dW_fro"] > 0).tolist() == [n == "layers.1.up_proj" for n in cmp["name"]]
    assert os.path.getsize(out / "index.html") > 20_000
