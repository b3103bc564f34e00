"""LoRA adapter analysis against PEFT itself (a real LoraConfig, dense B.A from PEFT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frogwatch
from frogwatch.adapters import adapter_eigenvalues, lora_factors

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lora_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=200, max_position_embeddings=64)  # fmt: skip
    base = transformers.BertModel(cfg)
    lcfg = peft.LoraConfig(r=12, lora_alpha=24, target_modules=["query", "value", "dense"],
                           init_lora_weights=False)  # random B, so that B.A != 0  # fmt: skip
    return peft.get_peft_model(base, lcfg).double()  # float64: PEFT's dense delta to round-off


def peft_deltas(model):
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            out[name.removeprefix("base_model.model.")] = m.get_delta_weight("default").detach().double()
    return out


def test_adapter_spectra_match_peft_dense_delta(lora_bert):
    deltas = peft_deltas(lora_bert)
    df = frogwatch.analyze(lora_bert, peft=True, progress=False)
    assert len(df) == len(deltas) == 2 * 5 + 1  # query, value and 3 dense per layer, and the pooler
    assert set(df["name"]) == set(deltas) and (df["lora_rank"] == 12).all()
    for f in lora_factors(lora_bert):
        D = deltas[f.name].numpy()
        dense = np.sort(np.linalg.eigvalsh(D.T @ D if D.shape[0] >= D.shape[1] else D @ D.T))[-12:]
        np.testing.assert_allclose(adapter_eigenvalues(f.A, f.B, f.scaling), dense, rtol=1e-9)
        row = df[df["name"] == f.name].iloc[0]
        assert row["norm"] == pytest.approx(float((D**2).sum()), rel=1e-10)
        assert row["lambda_max"] == pytest.approx(dense[-1], rel=1e-10)
        assert row["num_evals"] == 12 and row["matrix_rank"] == 12
    assert (df["status"] == "success").all() and df["alpha"].notna().all()


def test_adapter_directory_equals_module(lora_bert, tmp_path):
    lora_bert.save_pretrained(str(tmp_path / "adapter"))
    a = frogwatch.analyze(lora_bert, peft=True, progress=False)
    b = frogwatch.analyze(str(tmp_path / "adapter"), peft=True, progress=False)
    assert sorted(a["name"]) == sorted(b["name"])
    b = b.set_index("name").loc[a["name"]]
    np.testing.assert_allclose(a["alpha"], b["alpha"], rtol=1e-6)
    np.testing.assert_allclose(a["norm"], b["norm"], rtol=1e-6)


def test_merged_equals_analyze_of_peft_merge(lora_bert, tmp_path):
    import copy

    df = frogwatch.analyze(lora_bert, peft="merged", progress=False)
    merged = copy.deepcopy(lora_bert).merge_and_unload()
    ref = frogwatch.analyze(merged, progress=False).set_index("name")
    assert len(df) == 11
    for _, row in df.iterrows():
        r = ref.loc[row["name"]]
        assert row["alpha"] == pytest.approx(r["alpha"], rel=1e-6)
        assert row["log_norm"] == pytest.approx(r["log_norm"], rel=1e-6)
    # an adapter directory with its base model gives the same
    lora_bert.save_pretrained(str(tmp_path / "ad"))
    base_sd = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
               for k, v in lora_bert.state_dict().items() if "lora_" not in k}  # fmt: skip
    df2 = frogwatch.analyze(str(tmp_path / "ad"), peft="merged", base=base_sd, progress=False)
    df2 = df2.set_index("name").loc[df["name"]]
    np.testing.assert_allclose(df2["alpha"], df["alpha"], rtol=1e-6)
    with pytest.raises(ValueError, match="needs base"):
        frogwatch.analyze(str(tmp_path / "ad"), peft="merged", progress=False)


def test_adapter_eigenvalues_small_core_is_exact():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 300)), rng.standard_normal((200, 4))
    D = 0.5 * B @ A
    np.testing.assert_allclose(adapter_eigenvalues(A, B, 0.5), np.sort(np.linalg.svd(D, compute_uv=False)[:4] ** 2), rtol=1e-10)
    with pytest.raises(frogwatch.SourceError):
        frogwatch.analyze(nn.Linear(3, 3), peft=True)


def test_frog_delta_file_alone_and_merged(mlp, tmp_path):
    import copy

    from frogwatch.frog.engine import effective_weight, prepare, save_delta

    base = copy.deepcopy(mlp)
    masks = {n: torch.rand(m.weight.shape, generator=torch.Generator().manual_seed(i)) < 0.4
             for i, (n, m) in enumerate(mlp.named_modules()) if isinstance(m, nn.Linear)}  # fmt: skip
    prepare(mlp, masks, init_scale=0.5, seed=3)
    path = save_delta(mlp, tmp_path / "delta.safetensors")
    mods = dict(mlp.named_modules())
    dense = {f"{n}.weight": (effective_weight(mods[n]) - mods[n].weight).detach().double() for n in masks}
    alone = frogwatch.analyze(str(path), peft=True, progress=False)
    ref = frogwatch.analyze(dense, progress=False)
    # the reference goes through float32 (W0 + dW) - W0, hence 1e-6
    np.testing.assert_allclose(alone["norm"], ref["norm"], rtol=1e-6)
    np.testing.assert_allclose(alone["alpha"], ref["alpha"], rtol=1e-5)
    assert (alone["norm"] > 0).all()
    merged = frogwatch.analyze(str(path), peft="merged", base=base, progress=False)
    tuned = frogwatch.analyze(mlp, progress=False)  # reads the prepared layers' effective weights
    np.testing.assert_allclose(merged["alpha"], tuned["alpha"], rtol=1e-6)
    np.testing.assert_allclose(merged["log_norm"], tuned["log_norm"], rtol=1e-6)
