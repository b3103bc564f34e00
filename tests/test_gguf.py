"""GGUF checkpoints as input (frogwatch/gguf_source.py), offline.

GGUF files are written here with ``gguf.GGUFWriter`` the way llama.cpp's converter writes them:
names mapped HF -> GGUF with the package's ``TensorNameMap``, the rows of llama's q/k projections
permuted, matrices quantised with ``gguf.quants.quantize``. The references are independent of
frogwatch's reader: the original model, and a state dict dequantised here with
``gguf.quants.dequantize`` and un-permuted by an index permutation (not frogwatch's reshape).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

import frogwatch
from frogwatch.cli import main
from frogwatch.sources import SourceError, layer_matrices

gguf = pytest.importorskip("gguf")  # in the [test] extra: a skip fails in CI
from gguf import GGMLQuantizationType as Q  # noqa: E402

NUMERIC = ["M", "N", "alpha", "xmin", "xmax", "D", "num_pl_spikes", "lambda_max", "log_norm",
           "log_spectral_norm", "alpha_weighted", "stable_rank", "entropy", "matrix_rank"]  # fmt: skip
QUANTS = [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q5_1]
N_HEAD, N_KV = 4, 2


def _llama_permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter writes: per head, (pair, half) -> (half, pair)."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def write_gguf(path, model, arch: str, qtype=Q.F32, *, permute: bool = True) -> dict[str, str]:
    """Write ``model`` as GGUF; return {gguf tensor name: HF name} of what was written."""
    sd = model.state_dict()
    n_blocks = model.config.num_hidden_layers
    members = [a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch]
    tmap = gguf.TensorNameMap(members[0], n_blocks)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_blocks)
    if arch == "llama":
        w.add_head_count(N_HEAD)
        w.add_head_count_kv(N_KV)
    names = {}
    for key, v in sd.items():
        a = v.detach().to(torch.float32).numpy()
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias")) or key  # unmapped: kept
        if arch == "llama" and permute and key.endswith(("q_proj.weight", "k_proj.weight")):
            a = a[_llama_permute_rows(a.shape[0], N_HEAD if "q_proj" in key else N_KV)]
        if arch == "gpt2" and key.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            a = np.ascontiguousarray(a.T)  # llama.cpp stores HF Conv1D (in x out) as (out, in)
        if a.ndim == 2 and qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
        names[name] = key
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return names


def dequantised_state_dict(path, names: dict[str, str], arch: str) -> dict[str, torch.Tensor]:
    """Independent reference: every tensor dequantised by gguf, un-permuted by index."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        a = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        key = names[t.name]
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            a = a[np.argsort(_llama_permute_rows(a.shape[0], N_HEAD if "q_proj" in key else N_KV))]
        out[key] = torch.from_numpy(a)
    return out


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_KV)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_files(llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {q: (d / f"llama-{q.name}.gguf", write_gguf(d / f"llama-{q.name}.gguf", llama, "llama", q))
            for q in [Q.F32, *QUANTS]}  # fmt: skip


@pytest.fixture(scope="module")
def minilm_files(minilm_session, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-bert")
    return {q: (d / f"minilm-{q.name}.gguf", write_gguf(d / f"minilm-{q.name}.gguf", minilm_session, "bert", q))
            for q in (Q.F32, Q.Q8_0)}  # fmt: skip


def assert_same_rows(df_a: pd.DataFrame, df_b: pd.DataFrame, tol: float = 1e-12) -> None:
    a, b = df_a.set_index("name"), df_b.set_index("name")
    assert sorted(a.index) == sorted(b.index)
    b = b.loc[a.index]
    assert (a["layer_type"] == b["layer_type"]).all()
    for c in NUMERIC:
        np.testing.assert_allclose(b[c].to_numpy(float), a[c].to_numpy(float), rtol=tol, atol=tol,
                                   equal_nan=True, err_msg=c)  # fmt: skip


# --- (a) an F32 GGUF is the original model --------------------------------------------------


def test_f32_llama_gguf_analyses_like_the_original(llama, llama_files):
    path, _ = llama_files[Q.F32]
    mats = layer_matrices(path)
    orig = {lm.name: lm for lm in layer_matrices(llama)}
    assert sorted(lm.name for lm in mats) == sorted(orig)  # HF names, lm_head included
    for lm in mats:
        assert lm.shape == orig[lm.name].shape and lm.layer_type == orig[lm.name].layer_type
    assert_same_rows(frogwatch.analyze(llama, progress=False), frogwatch.analyze(path, progress=False))
    # element for element the original weights: shapes (out, in) and q/k rows un-permuted
    d = frogwatch.distances(llama, path, progress=False)
    assert len(d) == len(orig) and (d["fro"] == 0).all()


def test_f32_minilm_gguf_analyses_like_the_original(minilm_session, minilm_df, minilm_files):
    path, names = minilm_files[Q.F32]
    assert "pooler.dense.weight" in names  # not in gguf's bert map: written and read under its HF name
    assert_same_rows(minilm_df, frogwatch.analyze(path, progress=False))
    d = frogwatch.distances(minilm_session, str(path), progress=False)
    assert len(d) == len(layer_matrices(minilm_session)) == 40 and (d["fro"] == 0).all()


def test_llama_qk_permutation_changes_distances_not_spectra(llama, llama_files, monkeypatch):
    """What llama.cpp's converter does to q/k (checked here on its permutation): a row
    permutation, so alpha & co are unchanged but element-wise distances are not."""
    import frogwatch.gguf_source as gs

    path, _ = llama_files[Q.F32]
    monkeypatch.setattr(gs, "_PERMUTED_QK", set())  # read the rows as stored
    assert_same_rows(frogwatch.analyze(llama, progress=False), frogwatch.analyze(path, progress=False))
    d = frogwatch.distances(llama, path, progress=False).set_index("name")
    qk = d.index.str.contains(r"\.(?:q|k)_proj$")
    assert qk.sum() == 4 and (d.loc[qk, "rel"] > 0.5).all() and (d.loc[~qk, "fro"] == 0).all()


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_gpt2_gguf_reads_its_conv1d_weights_back_as_conv1d(tmp_path, qtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2,
                                       n_head=4)).eval()  # fmt: skip
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, model, "gpt2", qtype)
    orig = {lm.name: lm for lm in layer_matrices(model)}
    mats = {lm.name: lm for lm in layer_matrices(path)}
    assert set(mats) - set(orig) == {"lm_head"}  # tied to transformer.wte in HF, a copy in GGUF
    assert set(orig) <= set(mats)
    for n, lm in orig.items():
        assert (mats[n].layer_type, mats[n].shape) == (lm.layer_type, lm.shape), n
    assert sum(lm.layer_type == "conv1d" for lm in mats.values()) == 8
    d = frogwatch.distances(model, path, progress=False)
    assert len(d) == len(orig) and d.attrs["b_only"] == ["lm_head"] and not d.attrs["mismatched"]
    assert (d["fro"] == 0).all() if qtype == Q.F32 else (d["rel"] < 0.02).all()


# --- (b) a quantised GGUF is its dequantised weights ----------------------------------------


@pytest.mark.parametrize("qtype", QUANTS, ids=lambda q: q.name)
def test_quantised_llama_rows_equal_the_dequantised_state_dict(llama_files, qtype):
    path, names = llama_files[qtype]
    ref = dequantised_state_dict(path, names, "llama")
    df = frogwatch.analyze(path, progress=False)
    assert_same_rows(frogwatch.analyze(ref, progress=False), df)
    d = frogwatch.distances(ref, path, progress=False)
    assert len(d) == len(df) and (d["fro"] == 0).all()


def test_quantised_minilm_rows_equal_the_dequantised_state_dict(minilm_files):
    path, names = minilm_files[Q.Q8_0]
    ref = dequantised_state_dict(path, names, "bert")
    assert_same_rows(frogwatch.analyze(ref, progress=False), frogwatch.analyze(path, progress=False))


# --- (c) compare / distances against the original match every layer -------------------------


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_compare_original_with_quantised_matches_every_layer(llama, llama_files, qtype):
    path, _ = llama_files[qtype]
    n = len(layer_matrices(llama))
    cmp = frogwatch.compare(llama, path)
    assert len(cmp) == n and not cmp.attrs["base_only"] and not cmp.attrs["tuned_only"]
    assert (cmp["dW_status"] != "not found").all()
    d = frogwatch.distances(llama, path, progress=False)
    assert len(d) == n and not (d.attrs["a_only"] or d.attrs["b_only"] or d.attrs["mismatched"])
    # the quantisation error: small, and larger for 4 bits than for 8
    assert (d["rel"] > 0).all() and (d["rel"] < (0.02 if qtype == Q.Q8_0 else 0.2)).all()


def test_compare_minilm_with_its_q8_gguf(minilm_session, minilm_df, minilm_files):
    from frogwatch.diagnostics.compare import compare_tables
    from frogwatch.sources import resolve_source

    src = resolve_source(str(minilm_files[Q.Q8_0][0]))
    cmp = compare_tables(minilm_df, frogwatch.analyze(src, progress=False), minilm_session, src)
    assert len(cmp) == len(minilm_df) and not cmp.attrs["base_only"] and not cmp.attrs["tuned_only"]
    assert (cmp["alpha_change"].abs() < 0.5).all()


def test_cli_reads_gguf(llama_files, capsys, tmp_path):
    path, _ = llama_files[Q.Q8_0]
    f32 = str(llama_files[Q.F32][0])
    assert main(["analyze", str(path), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    table = pd.read_csv(next((tmp_path / "a").glob("*.csv")))
    assert "model.layers.1.mlp.down_proj" in set(table["name"]) and len(table) == 16
    assert main(["describe", str(path)]) == 0
    assert "model.layers.1.self_attn.k_proj" in capsys.readouterr().out
    assert main(["distances", f32, str(path), "--out", str(tmp_path / "d.csv"), "--quiet"]) == 0
    assert len(pd.read_csv(tmp_path / "d.csv")) == 16
    assert main(["compare", f32, str(path), "--out", str(tmp_path / "c.csv"), "--quiet"]) == 0
    assert len(pd.read_csv(tmp_path / "c.csv")) == 16


# --- (d) one-line errors --------------------------------------------------------------------


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"frogwatch {argv[0]}: error: "), err
    return lines[0]


@pytest.mark.parametrize("damage", ["truncated", "header-only", "text", "empty", "safetensors"])
def test_damaged_gguf_is_a_one_line_error(llama, llama_files, tmp_path, capsys, damage):
    from safetensors.torch import save

    data = llama_files[Q.Q8_0][0].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"truncated": data[: len(data) - 100], "header-only": data[:40],
                     "text": b"this is not a gguf file\n" * 20, "empty": b"",
                     "safetensors": save({k: v.contiguous() for k, v in llama.state_dict().items()})
                     }[damage])  # fmt: skip
    with pytest.raises(SourceError, match="not a readable GGUF file"):
        layer_matrices(bad)
    for cmd in ("analyze", "describe"):
        assert "not a readable GGUF file" in _cli_error(capsys, [cmd, str(bad)])


def test_missing_gguf_package_says_how_to_install(llama_files, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    path = str(llama_files[Q.F32][0])
    with pytest.raises(SourceError, match=r"pip install 'frogwatch\[gguf\]'"):
        layer_matrices(path)
    assert "pip install 'frogwatch[gguf]'" in _cli_error(capsys, ["analyze", path])


# --- (e) one tensor dequantised at a time ---------------------------------------------------


def test_one_tensor_dequantised_per_load(llama_files, monkeypatch):
    path, names = llama_files[Q.Q4_0]
    calls: list[tuple[int, ...]] = []
    real = gguf.quants.dequantize

    def counting(data, qtype):
        out = real(data, qtype)
        calls.append(out.shape)
        return out

    monkeypatch.setattr(gguf.quants, "dequantize", counting)
    mats = layer_matrices(path)
    assert calls == []  # listing reads headers only
    lm = next(m for m in mats if m.name == "model.layers.1.mlp.up_proj")
    assert tuple(lm.load().shape) == lm.shape == (160, 64) and calls == [(160, 64)]
    calls.clear()
    seen_at_first_layer = []

    def hook(lm, Ws, spectrum, fit):
        seen_at_first_layer.append(len(calls))
        return {}

    df = frogwatch.analyze(path, progress=False, hooks=[hook])
    assert len(calls) == len(df) == len(mats)  # each matrix dequantised once, nothing else
    assert seen_at_first_layer[0] < len(mats)  # the first layer is solved before all are read
