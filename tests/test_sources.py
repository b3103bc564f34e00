"""Every model source gives the same rows; bad input gets a clear error or a failed row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from frogwatch import SourceError, analyze, describe, layer_matrices, summary
from frogwatch.sources import natural_key

from _shards import write_sharded

METRICS = ["layer_type", "M", "N", "Q", "rf", "num_evals", "alpha", "xmin", "D", "log_norm",
           "log_spectral_norm", "alpha_weighted", "stable_rank", "matrix_rank", "status"]  # fmt: skip


def by_name(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("name").sort_index()[METRICS]


def test_module_state_dict_file_and_shards_give_identical_rows(minilm_session, tmp_path):
    ref = by_name(analyze(minilm_session, progress=False))
    sd = {k: v.clone() for k, v in minilm_session.state_dict().items()}

    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save(sd, tmp_path / "model.pt")
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    write_sharded(sd, shard_dir)

    for source in (sd, wrapped, tmp_path / "model.safetensors", str(tmp_path / "model.pt"),
                   shard_dir, shard_dir / "model.safetensors.index.json"):  # fmt: skip
        got = by_name(analyze(source, progress=False))
        pd.testing.assert_frame_equal(got, ref, check_exact=True)


def test_hf_model_directory_is_a_source(minilm_session):
    from frogwatch.sources import default_model_path

    got = by_name(analyze(default_model_path(), progress=False))
    pd.testing.assert_frame_equal(got, by_name(analyze(minilm_session, progress=False)))


def test_sharded_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    import frogwatch.sources as src

    sd = {f"layer.{i}.weight": torch.randn(64, 32) for i in range(12)}
    write_sharded(sd, tmp_path, shards=4)
    mats = layer_matrices(tmp_path)
    # natural order from the index, not alphabetical (layer.2 before layer.10)
    assert [m.name for m in mats] == [f"layer.{i}" for i in range(12)]
    loads = []
    orig = src._single_tensor_loader

    def counting(path, key):
        inner = orig(path, key)
        return lambda: (loads.append(key), inner())[1]

    monkeypatch.setattr(src, "_single_tensor_loader", counting)
    df = analyze(tmp_path, progress=False)
    assert len(df) == 12
    # each tensor read exactly once (layers run side by side, so reads may interleave)
    assert sorted(loads, key=natural_key) == [f"layer.{i}.weight" for i in range(12)]
    assert list(df["name"]) == [f"layer.{i}" for i in range(12)]  # rows keep the source order


def test_linear_conv_embedding_rnn_and_tied_weights():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.conv = nn.Conv2d(4, 16, 3)
            self.lstm = nn.LSTM(32, 20)
            self.gru = nn.GRU(20, 12)
            self.head = nn.Linear(32, 100, bias=False)
            self.head.weight = self.emb.weight  # tied

    m = M()
    mats = layer_matrices(m)
    names = [x.name for x in mats]
    assert "head" not in names and names[0] == "emb"  # tied weight counted once
    lstm = [x for x in mats if x.name.startswith("lstm.weight_ih_l0")]
    assert [x.name[-3:] for x in lstm] == ["[i]", "[f]", "[g]", "[o]"]
    assert all(x.shape == (20, 32) for x in lstm)
    gru = [x for x in mats if x.name.startswith("gru.weight_hh_l0")]
    assert [x.shape for x in gru] == [(12, 12)] * 3
    # each gate's spectrum is the SVD of that slice of the stacked weight
    df = analyze(m, progress=False, min_evals=1)
    row = df.set_index("name").loc["lstm.weight_hh_l0[f]"]
    sv = np.linalg.svd(m.lstm.weight_hh_l0.detach().double().numpy()[20:40], compute_uv=False)
    assert row["lambda_max"] == pytest.approx(sv.max() ** 2, rel=1e-12)
    assert row["norm"] == pytest.approx((sv**2).sum(), rel=1e-12)
    conv = df.set_index("name").loc["conv"]
    assert (conv["M"], conv["N"], conv["rf"], conv["num_evals"]) == (4, 16, 9, 36)


def test_conv_unpooled_gives_one_row_per_slice(convnet):
    df = analyze(convnet, pool=False, layers=["conv1"], progress=False, min_evals=1)
    assert list(df["name"]) == [f"conv1[{i},{j}]" for i in range(3) for j in range(3)]
    W = convnet.conv1.weight.detach().double()
    sv = np.linalg.svd((W[:, :, 1, 2] * np.sqrt(9 / 2)).numpy(), compute_uv=False)
    assert df.set_index("name").loc["conv1[1,2]", "lambda_max"] == pytest.approx(sv.max() ** 2)


def test_describe_lists_skipped_layers_without_reading(minilm_session):
    d = describe(minilm_session)
    assert len(d) == 40 and d["analyzed"].sum() == 39
    skipped = d[~d["analyzed"]].iloc[0]
    assert skipped["name"] == "embeddings.token_type_embeddings"
    assert "min_evals" in skipped["skip_reason"]
    df = analyze(minilm_session, layers=[r"encoder\.layer\.0\..*"], progress=False)
    assert len(df) == 6 and df["name"].str.startswith("encoder.layer.0.").all()
    assert df.attrs["skipped"] == []


def test_summary_leaves_out_failed_and_embeddings(mlp):
    df = analyze(mlp, progress=False)
    df.loc[0, ["status", "alpha", "alpha_weighted"]] = ["failed", np.nan, np.nan]
    s = summary(df)
    ok = df[df["status"] == "success"]
    assert s["num_layers"] == len(ok) and s["num_failed"] == 1
    assert s["alpha"] == pytest.approx(ok["alpha"].mean())
    assert s.index[0] == "alpha_weighted"


# ------------------------------------------------------------------------------- bad input


def test_no_analysable_layer_is_a_clear_error():
    with pytest.raises(SourceError, match="no analysable layer"):
        analyze(nn.Sequential(nn.ReLU(), nn.LayerNorm(8)), progress=False)
    with pytest.raises(SourceError, match="min_evals"):
        analyze(nn.Linear(300, 1), progress=False)  # a 1 x N matrix: skipped, and says why


def test_one_by_n_matrix_forced_in_fails_with_reason():
    df = analyze(nn.Linear(300, 1), min_evals=1, progress=False)
    assert df.loc[0, "status"] == "failed" and np.isnan(df.loc[0, "alpha"])
    assert "too few eigenvalues" in df.loc[0, "reason"]
    assert df.loc[0, "warning"] == ""


def test_nan_and_inf_weights_give_failed_rows(mlp):
    with torch.no_grad():
        mlp[0].weight[3, 4] = float("nan")
        mlp[2].weight[0, 0] = float("inf")
    df = analyze(mlp, progress=False)
    assert list(df["status"]) == ["failed", "failed", "success"]
    assert all("NaN/Inf" in r for r in df["reason"][:2])
    assert summary(df)["num_layers"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(mlp, dtype):
    ref = analyze(mlp, progress=False)
    low = analyze(mlp.to(dtype), progress=False)
    assert (low["status"] == "success").all()
    # the weights themselves were rounded, so only the norms are comparable tightly
    np.testing.assert_allclose(low["log_norm"], ref["log_norm"], atol=5e-3)


def test_meta_device_tensor_gives_failed_row():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    df = analyze(m, progress=False)
    assert (df["status"] == "failed").all()
    assert df["reason"].str.contains("meta device").all()


def test_truncated_safetensors_file(tmp_path, mlp):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SourceError, match="truncated"):
        analyze(path, progress=False)
    path.write_bytes(b"\x01")
    with pytest.raises(SourceError, match="not a safetensors file"):
        analyze(path, progress=False)


def test_wrong_path_and_wrong_types(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        analyze(tmp_path / "missing.safetensors", progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="unsupported file type"):
        analyze(tmp_path / "notes.txt", progress=False)
    with pytest.raises(SourceError, match="holds no model weights"):
        analyze(tmp_path, progress=False)
    with pytest.raises(SourceError, match="expected an nn.Module"):
        analyze(42, progress=False)
    with pytest.raises(SourceError, match="holds no tensors"):
        analyze({"a": 1}, progress=False)
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(SourceError, match="could not read"):
        analyze(tmp_path / "bad.pt", progress=False)


def test_bad_arguments(mlp):
    with pytest.raises(ValueError, match="fit must be"):
        analyze(mlp, fit="exp", progress=False)
    with pytest.raises(ValueError, match="min_evals"):
        analyze(mlp, min_evals=0, progress=False)
    with pytest.raises(ValueError, match="method"):
        analyze(mlp, method="qr", progress=False)


def test_missing_cuda_falls_back_to_cpu(mlp):
    if torch.cuda.is_available():
        df = analyze(mlp, device="cuda", progress=False)
    else:
        with pytest.warns(UserWarning, match="CUDA is not available"):
            df = analyze(mlp, device="cuda", progress=False)
    np.testing.assert_allclose(df["alpha"], analyze(mlp, progress=False)["alpha"], atol=1e-8)
