"""``frogwatch select`` on a tiny saved model."""

import argparse

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from frogwatch.cli import main
from frogwatch.commands.select import parse_budget
from frogwatch.frog import Masks, select


@pytest.fixture
def tiny_model_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    for i in range(3):  # names layers.<i>.fc1 / fc2, so the per-block chart has three blocks
        block = nn.Module()
        block.fc1, block.fc2 = nn.Linear(12, 16), nn.Linear(16, 12)
        model.add_module(f"b{i}", block)
    sd = {f"layers.{i}.{k}": v.contiguous() for i in range(3) for k, v in getattr(model, f"b{i}").state_dict().items()}
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    return path


def test_parse_budget():
    assert parse_budget("1%") == pytest.approx(0.01)
    assert parse_budget("0.01") == 0.01
    assert parse_budget("5000") == 5000 and isinstance(parse_budget("5000"), int)
    assert parse_budget("1.0") == 1.0 and isinstance(parse_budget("1.0"), float)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_budget("lots")


def test_cli_select_writes_masks_and_charts(tiny_model_file, tmp_path, capsys):
    out, plot, cmp = tmp_path / "masks.safetensors", tmp_path / "imp.png", tmp_path / "cmp.png"
    rc = main(
        ["select", str(tiny_model_file), "--budget", "10%", "--strategy", "global", "--out", str(out),
         "--plot", str(plot), "--compare-plot", str(cmp), "--no-progress"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layers.2.fc2" in printed and "selected_score_sum" in printed
    masks = Masks.load(out)
    assert masks == select(tiny_model_file, 0.1, strategy="global", progress=False)
    for png in (plot, cmp):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_select_blend_with_alpha_table_and_targets(tiny_model_file, tmp_path):
    table = tmp_path / "alpha.csv"
    pd.DataFrame({"name": ["layers.0.fc1", "layers.1.fc1"], "alpha": [2.0, 6.0]}).to_csv(table, index=False)
    out = tmp_path / "m.safetensors"
    rc = main(["select", str(tiny_model_file), "--budget", "20", "--blend", "1", "--alpha", str(table),
               "--targets", "fc1", "--out", str(out), "--no-progress"])
    assert rc == 0
    df = Masks.load(out).summary()
    assert df["name"].tolist() == ["layers.0.fc1", "layers.1.fc1", "layers.2.fc1"]
    assert df["multiplier"].tolist() == [0.0, 2.0, 1.0] and df["k"].sum() == 20
    assert df["k"].iloc[0] == 0


def test_cli_select_errors(tiny_model_file, tmp_path, capsys):
    assert main(["select", str(tmp_path / "missing.safetensors"), "--no-progress"]) == 1
    with pytest.raises(SystemExit) as e:  # an argument error: exit 2, before the model loads
        main(["select", str(tiny_model_file), "--blend", "2", "--no-progress"])
    assert e.value.code == 2
    assert "blend" in capsys.readouterr().err
    out = tmp_path / "never.safetensors"
    assert main(["select", str(tiny_model_file), "--targets", "nothing", "--out", str(out), "--no-progress"]) == 1
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["select", str(tiny_model_file), "--budget", "lots"])


def test_chart_functions_return_figures(tiny_model_file):
    from matplotlib.figure import Figure

    from frogwatch.plots_frog import (
        block_of,
        plot_block_importance,
        plot_matrix_importance,
        plot_strategy_comparison,
    )

    pm = select(tiny_model_file, 0.1, progress=False)
    gl = select(tiny_model_file, 0.1, strategy="global", progress=False)
    assert block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert block_of("transformer.h.11.mlp.c_fc") == "transformer.h.11" and block_of("pooler.dense") == "pooler.dense"
    fig = plot_matrix_importance(pm)
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) == 6
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx(pm.summary()["importance"].tolist())  # §9 for per-matrix
    fig = plot_block_importance(gl)
    heights = [p.get_height() for p in fig.axes[0].patches]
    by_block = gl.summary().groupby(gl.summary()["name"].map(block_of), sort=False)["selected_score_sum"].sum()
    assert heights == pytest.approx(by_block.tolist()) and len(heights) == 3  # §10 for global
    fig = plot_strategy_comparison(pm, gl, by="matrix")
    assert len(fig.axes) == 2 and len(fig.axes[1].patches) == 12
    with pytest.raises(ValueError, match="different matrices"):
        plot_strategy_comparison(pm, select(tiny_model_file, 0.1, targets="fc1", progress=False))
    with pytest.raises(ValueError, match="value"):
        plot_matrix_importance(pm, value="alpha")


def test_cli_select_score_seed_floor(tiny_model_file, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    rc = main(["select", str(tiny_model_file), "--budget", "1%", "--strategy", "global", "--score", "random",
               "--seed", "3", "--min-per-matrix", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    masks = Masks.load(out)
    assert masks == select(tiny_model_file, 0.01, strategy="global", score="random", seed=3, min_per_matrix=2,
                           progress=False)
    assert min(masks.counts().values()) >= 2 and masks.meta["score"] == "random"
    with pytest.warns(UserWarning, match="got no weights"):
        assert main(["select", str(tiny_model_file), "--budget", "3", "--strategy", "global", "--no-progress"]) == 0
    assert "--min-per-matrix" in capsys.readouterr().out
    assert main(["select", str(tiny_model_file), "--strategy", "global", "--score", "balanced", "--no-progress"]) == 1
    assert main(["select", str(tiny_model_file), "--score", "balanced", "--random-share", "0.5", "--no-progress"]) == 0
