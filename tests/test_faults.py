"""Faults survived: a shard that disappears or is truncated in the middle of analyze/select, a
full disk or a read-only target while writing masks, deltas, reports and CLI output (nothing
half-written, the old file intact), and Ctrl-C during a long CLI run."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

import frogwatch
from frogwatch.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({f"l.{i}.weight": _rand(40, 30, seed=i) for i in (0, 1)}, str(d / "a.safetensors"))
    save_file({f"l.{i}.weight": _rand(40, 30, seed=i) for i in (2, 3)}, str(d / "b.safetensors"))
    index = {"weight_map": {"l.0.weight": "a.safetensors", "l.1.weight": "a.safetensors",
                            "l.2.weight": "b.safetensors", "l.3.weight": "b.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _messages(err: str) -> list[str]:
    """The lines a user reads on stderr, progress-bar redraws left out."""
    parts = [t.strip() for t in err.replace("\r", "\n").split("\n")]
    return [t for t in parts if t and "%|" not in t]


def _break(path: Path, how: str) -> None:
    if how == "vanish":
        path.unlink()
    else:  # truncated: the header survives, the data does not
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def break_second_read(monkeypatch):
    """After the first tensor read, break shard b (the reads go through safetensors.safe_open)."""

    def arm(shard: Path, how: str) -> None:
        orig, calls = safetensors.safe_open, [0]

        def safe_open(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2 and shard.exists():
                _break(shard, how)
            return orig(*args, **kwargs)

        monkeypatch.setattr(safetensors, "safe_open", safe_open)

    return arm


@pytest.mark.parametrize("how", ["vanish", "truncate"])
def test_shard_breaking_mid_analyze_gives_failed_rows(sharded, break_second_read, how):
    break_second_read(sharded / "b.safetensors", how)
    df = frogwatch.analyze(sharded, progress=False)
    assert list(df["name"]) == ["l.0", "l.1", "l.2", "l.3"]
    assert (df["status"][:2] == "success").all()
    bad = df[df["status"] == "failed"]
    assert set(bad["name"]) == {"l.2", "l.3"}
    assert bad["reason"].str.contains("could not read").all()
    assert bad["alpha"].isna().all()


@pytest.mark.parametrize("how", ["vanish", "truncate"])
def test_shard_breaking_mid_select_is_one_clear_error(sharded, break_second_read, how, capsys):
    break_second_read(sharded / "b.safetensors", how)
    with pytest.raises((frogwatch.SourceError, FileNotFoundError)) as e:
        frogwatch.select(sharded, 0.1, progress=False)
    assert "b.safetensors" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("how", ["vanish", "truncate"])
def test_shard_breaking_mid_cli_select_is_one_line(sharded, break_second_read, how, tmp_path, capsys):
    break_second_read(sharded / "b.safetensors", how)
    out = tmp_path / "m.safetensors"
    assert cli(["select", str(sharded), "--budget", "10%", "--out", str(out)]) == 1
    (msg,) = _messages(capsys.readouterr().err)
    assert msg.startswith("frogwatch select: error:") and "b.safetensors" in msg
    assert not out.exists()


# ---- full disk / read-only target ------------------------------------------------------------


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


KINDS = ["disk-full", "read-only"]


def break_writes(monkeypatch, kind: str) -> None:
    """From now on writes fail: half-way with ENOSPC (disk full), or the directory refuses new
    files with EROFS (read-only target; root ignores chmod, so the refusal is injected)."""
    if kind == "read-only":
        def refuse(*_a, **_k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        return
    import builtins

    import matplotlib.figure
    import safetensors.torch

    real_save, real_open = safetensors.torch.save_file, builtins.open

    def half_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        _enospc()

    def half_text(self, path_or_buf=None, *a, **k):
        if path_or_buf is None:  # to a string: no disk involved
            return real_to_str[type(self)](self, None, *a, **k)
        Path(path_or_buf).write_text("partial,")
        _enospc()

    class HalfFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            _enospc()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return HalfFile(f) if ("w" in mode and str(file).endswith(".tmp")) else f

    real_to_str = {pd.DataFrame: pd.DataFrame.to_csv, pd.Series: pd.Series.to_json}
    monkeypatch.setattr(safetensors.torch, "save_file", half_save)
    monkeypatch.setattr(pd.DataFrame, "to_csv", half_text)
    monkeypatch.setattr(pd.Series, "to_json", half_text)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _enospc)
    monkeypatch.setattr(builtins, "open", open_)


def _no_temp_left(d: Path) -> None:
    assert sorted(p.name for p in d.rglob("*") if p.name.endswith(".tmp")) == []


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


@pytest.mark.parametrize("kind", KINDS)
def test_masks_save_keeps_the_old_file(tmp_path, monkeypatch, kind):
    model = _mlp()
    path = tmp_path / "masks.safetensors"
    frogwatch.select(model, 0.1, progress=False).save(path)
    old = path.read_bytes()
    new = frogwatch.select(model, 0.3, progress=False)
    break_writes(monkeypatch, kind)
    with pytest.raises(OSError):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    _no_temp_left(tmp_path)
    assert frogwatch.Masks.load(path).n_selected == round(0.1 * (600 + 300))


@pytest.mark.parametrize("kind", KINDS)
def test_save_delta_keeps_the_old_file(tmp_path, monkeypatch, kind):
    model = frogwatch.prepare(_mlp(), frogwatch.select(_mlp(), 0.1, progress=False))
    path = tmp_path / "delta.safetensors"
    frogwatch.save_delta(model, path)
    old = path.read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    break_writes(monkeypatch, kind)
    with pytest.raises(OSError):
        frogwatch.save_delta(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    _no_temp_left(tmp_path)
    frogwatch.load_delta(_mlp(), path)  # still a valid delta file


@pytest.mark.parametrize("kind", KINDS)
def test_report_keeps_the_old_files(tmp_path, monkeypatch, kind):
    # frogwatch.report is shadowed by the submodule once anything imports frogwatch.report
    from frogwatch.html_report import report

    model = _mlp()
    out = tmp_path / "report"
    report(model, out_dir=out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    break_writes(monkeypatch, kind)
    with pytest.raises(OSError):
        report(model, out_dir=out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    _no_temp_left(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_analyze_and_select_keep_old_outputs_and_say_one_line(tmp_path, monkeypatch, kind, capsys):
    src = tmp_path / "m.safetensors"
    save_file({"a.weight": _rand(40, 30), "b.weight": _rand(30, 40, seed=1)}, str(src))
    out, masks = tmp_path / "out", tmp_path / "masks.safetensors"
    assert cli(["analyze", str(src), "--quiet", "--out", str(out)]) == 0
    assert cli(["select", str(src), "--budget", "5%", "--out", str(masks)]) == 0
    old = {p: p.read_bytes() for p in (out / "analyze.csv", out / "summary.json", masks)}
    save_file({"a.weight": _rand(40, 30, seed=5), "b.weight": _rand(30, 40, seed=6)}, str(src))
    capsys.readouterr()
    break_writes(monkeypatch, kind)
    assert cli(["analyze", str(src), "--quiet", "--out", str(out)]) == 1
    (msg,) = _messages(capsys.readouterr().err)
    assert msg.startswith("frogwatch analyze: error:")
    assert cli(["select", str(src), "--budget", "5%", "--out", str(masks)]) == 1
    (msg,) = _messages(capsys.readouterr().err)
    assert msg.startswith("frogwatch select: error:")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in old} == old
    _no_temp_left(tmp_path)


# ---- Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_during_cli_analyze_exits_cleanly(tmp_path):
    src = tmp_path / "big.safetensors"
    save_file({f"layer.{i}.weight": _rand(600, 600, seed=i) for i in range(48)}, str(src))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Each layer's fit is slowed by 0.5 s so that a fast machine is still mid-analyze when the
    # signal comes (the CLI itself runs unchanged: main() with the same arguments).
    slow_cli = (
        "import sys, time, frogwatch.analyze\n"
        "a = sys.modules['frogwatch.analyze']  # the module; frogwatch.analyze is the function\n"
        "fit = a.fit_power_law\n"
        "a.fit_power_law = lambda *x, **k: (time.sleep(0.5), fit(*x, **k))[1]\n"
        "from frogwatch.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    # A shell that starts a job in the background (`cmd &` without job control, as CI scripts may)
    # ignores SIGINT in it, and Python then installs no KeyboardInterrupt handler: give the child
    # the default disposition, as a terminal's foreground process has.
    p = subprocess.Popen([sys.executable, "-c", slow_cli, "analyze", str(src), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = b""
    deadline = time.monotonic() + 300
    while not re.search(rb"[1-9]\d*/48", err):  # the progress bar shows a layer done: mid-analyze
        chunk = os.read(p.stderr.fileno(), 4096)
        assert chunk, "analyze ended before it was interrupted: " + err.decode(errors="replace")
        err += chunk
        assert time.monotonic() < deadline
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    rest_out, rest_err = p.communicate(timeout=120)
    err = (err + rest_err).decode(errors="replace")
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert _messages(err) == ["interrupted"], err
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written
