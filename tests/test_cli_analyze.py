"""The `frogwatch analyze` / `describe` command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from safetensors.torch import save_file

from frogwatch.cli import main


def test_analyze_writes_table_and_summary(tmp_path, mlp, capsys):
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
    out = tmp_path / "out"
    assert main(["analyze", str(path), "--out", str(out), "--format", "json", "--quiet"]) == 0
    rows = json.loads((out / "analyze.json").read_text())
    assert [r["name"] for r in rows] == ["0", "2", "4"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_layers"] == 3
    assert "alpha_weighted" in capsys.readouterr().out
    assert not list(out.glob(".*tmp"))  # no temp files left behind


def test_analyze_default_model_end_to_end(tmp_path):
    """The README quickstart's main job, in a subprocess like a user's shell."""
    r = subprocess.run(
        [sys.executable, "-m", "frogwatch.cli", "analyze", "--out", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "analyze.csv")
    assert len(df) == 39 and (df["status"] == "success").all()
    assert "alpha_weighted" in r.stdout


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_describe_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "analyze" in capsys.readouterr().out
