"""What a new user sees from the command line: one-line errors, and checks before the work."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import frogwatch
from frogwatch.cli import main

ANALYZE_MODULE = sys.modules["frogwatch.analyze"]


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24))
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any model is loaded or analysed: the error must come first."""

    def boom(*a, **k):
        raise AssertionError("the expensive work ran before the check")

    select_module = importlib.import_module("frogwatch.frog.select")  # imported before any patch
    report_module = importlib.import_module("frogwatch.html_report")
    monkeypatch.setattr(ANALYZE_MODULE, "analyze", boom)
    monkeypatch.setattr("frogwatch.sources.load_default_model", boom)
    monkeypatch.setattr(select_module, "select", boom)
    monkeypatch.setattr(report_module, "report", boom)


def _one_line_error(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"frogwatch {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("usage: "), lines  # one short usage line
    assert ": error: " in lines[1]
    return lines[1]


# --- argument errors: exit 2 with a one-line usage, before any model is loaded ----------------


@pytest.mark.parametrize("budget", ["150%", "0", "0%", "-1", "1.5", "lots"])
def test_bad_budget_is_an_argument_error(capsys, no_work, budget):
    msg = _usage_error(capsys, ["select", "--budget", budget])
    assert "budget" in msg


@pytest.mark.parametrize("blend", ["2", "-0.1", "x"])
def test_bad_blend_is_an_argument_error(capsys, no_work, blend):
    assert "--blend" in _usage_error(capsys, ["select", "--blend", blend])


def test_unknown_option_and_command(capsys):
    assert "--nope" in _usage_error(capsys, ["analyze", "--nope"])
    _usage_error(capsys, ["frobnicate"])
    _usage_error(capsys, ["select", "--rank", "0"])


# --- runtime errors: exit 1, one line, before the expensive work -------------------------------


def test_analyze_out_under_a_file(tmp_path, model_file, capsys, no_work):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["analyze", str(model_file), "--out", str(blocker / "sub"), "--quiet"]) == 1
    line = _one_line_error(capsys.readouterr().err, "analyze")
    assert "is a file" in line
    assert main(["analyze", str(model_file), "--out", str(blocker)]) == 1  # --out DIR is a file
    _one_line_error(capsys.readouterr().err, "analyze")


def test_select_and_report_out_under_a_file(tmp_path, model_file, capsys, no_work):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["select", str(model_file), "--out", str(blocker / "m.safetensors")]) == 1
    assert "is a file" in _one_line_error(capsys.readouterr().err, "select")
    assert main(["select", str(model_file), "--plot", str(blocker / "p.png")]) == 1
    _one_line_error(capsys.readouterr().err, "select")
    assert main(["report", str(model_file), "--out", str(blocker / "r")]) == 1
    _one_line_error(capsys.readouterr().err, "report")


def test_compare_checks_the_second_path_first(tmp_path, model_file, capsys, no_work):
    assert main(["compare", str(model_file), str(tmp_path / "nonexistent")]) == 1
    line = _one_line_error(capsys.readouterr().err, "compare")
    assert "nonexistent" in line and "TUNED" in line


def test_missing_paths(tmp_path, model_file, capsys, no_work):
    for argv in (["analyze", str(tmp_path / "nope")], ["describe", str(tmp_path / "nope")],
                 ["report", str(model_file), "--base", str(tmp_path / "nope")],
                 ["select", str(model_file), "--alpha", str(tmp_path / "nope.csv")]):  # fmt: skip
        assert main(argv) == 1, argv
        _one_line_error(capsys.readouterr().err, argv[0])


def test_parquet_without_pyarrow_fails_before_the_analysis(monkeypatch, model_file, tmp_path, capsys, no_work):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    assert main(["analyze", str(model_file), "--out", str(tmp_path / "o"), "--format", "parquet"]) == 1
    assert "pyarrow" in _one_line_error(capsys.readouterr().err, "analyze")
    assert not (tmp_path / "o").exists()


def test_an_unexpected_error_is_one_line(monkeypatch, model_file, capsys):
    def fail(*a, **k):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(ANALYZE_MODULE, "analyze", fail)
    assert main(["analyze", str(model_file)]) == 1
    line = _one_line_error(capsys.readouterr().err, "analyze")
    assert line.endswith("RuntimeError: something broke second line")


def test_in_a_real_shell_no_traceback(tmp_path, model_file):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "frogwatch.cli", "analyze", str(model_file), "--out",
                        str(blocker / "x"), "--quiet"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# --- output -----------------------------------------------------------------------------------


def test_analyze_summary_counts_are_ints(model_file, tmp_path, capsys):
    assert main(["analyze", str(model_file), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^num_layers\s+2$", out, flags=re.M) and re.search(r"^num_failed\s+0$", out, flags=re.M)
    for line in out.splitlines():
        if line.startswith(("num_layers", "num_failed")):
            assert "." not in line, line
    text = (tmp_path / "o" / "summary.json").read_text()
    assert '"num_layers":2' in text.replace(" ", "") and '"num_failed":0' in text.replace(" ", "")
    assert "-0.0000" not in out


def test_compare_and_report_show_progress(model_file, tmp_path, capsys):
    assert main(["compare", str(model_file), str(model_file)]) == 0
    err = capsys.readouterr().err
    assert "frogwatch compare" in err
    assert main(["report", str(model_file), "--out", str(tmp_path / "r"), "--no-randomize"]) == 0
    assert "frogwatch report" in capsys.readouterr().err


def test_compare_prints_no_negative_zero(model_file, capsys):
    assert main(["compare", str(model_file), str(model_file), "--quiet"]) == 0
    assert "-0.0000" not in capsys.readouterr().out


def test_frogwatch_report_is_the_function(model_file, tmp_path):
    importlib.import_module("frogwatch.html_report")
    assert main(["report", str(model_file), "--out", str(tmp_path / "r"), "--no-randomize", "--quiet"]) == 0
    assert callable(frogwatch.report) and frogwatch.report.__name__ == "report"
    assert frogwatch.report(str(model_file), out_dir=tmp_path / "r2", randomize=False).name == "index.html"
