"""Streaming ``merge_checkpoint`` / ``frogwatch merge`` against the in-memory ``merge``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from frogwatch import MaskMismatchError
from frogwatch.cli import main
from frogwatch.frog.checkpoint import merge_checkpoint
from frogwatch.frog.io import save_delta
from frogwatch.frog.layer import frog_layers
from frogwatch.frog.model import merge, prepare

transformers = pytest.importorskip("transformers")


def llama(n_layers: int = 4):
    """A 4-block Llama-shaped decoder, bf16, random init from a config (no network)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=n_layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.fixture
def sharded(tmp_path):
    """(base model, checkpoint dir with several shards + index, prepared model, delta file)."""
    model = llama()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, max_shard_size="20KB", safe_serialization=True)
    assert (base_dir / "model.safetensors.index.json").is_file()
    assert len(list(base_dir.glob("*.safetensors"))) > 2
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=g) < 0.1
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    tuned = prepare(copy.deepcopy(model), masks, train_bias=False)
    with torch.no_grad():
        for m in frog_layers(tuned).values():  # fp32 master deltas, some below bf16 resolution
            m.frog_delta.copy_(torch.randn(m.frog_delta.shape, generator=g) * 3e-3)
    delta = save_delta(tuned, tmp_path / "delta.safetensors")
    return model, base_dir, tuned, delta


def test_streaming_merge_equals_in_memory_merge_bit_for_bit(sharded, tmp_path):
    model, base_dir, tuned, delta = sharded
    out = merge_checkpoint(base_dir, delta, tmp_path / "out", progress=False)
    ref = merge(tuned).state_dict()
    merged = {}
    for f in sorted(out.glob("*.safetensors")):
        merged.update(load_file(f))
    changed = 0
    for key, t in merged.items():
        assert torch.equal(t, ref[key]), key
        changed += not torch.equal(t, model.state_dict()[key])
    assert changed == 4 * 7  # every targeted projection of the 4 blocks
    index_in = json.loads((base_dir / "model.safetensors.index.json").read_text())
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_out == index_in  # same shards, same layout
    assert (out / "config.json").is_file()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for key, t in reloaded.state_dict().items():  # transformers reads it back
        assert torch.equal(t, ref[key]), key


def test_merge_is_atomic_and_checks_fit(sharded, tmp_path, monkeypatch):
    model, base_dir, tuned, delta = sharded
    import safetensors.torch as st

    calls = {"n": 0}
    real = st.save_file

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoint(base_dir, delta, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left
    monkeypatch.undo()

    other = llama(n_layers=2)
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir, safe_serialization=True)
    with pytest.raises(MaskMismatchError, match="does not fit"):
        merge_checkpoint(other_dir, delta, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_cli_merge(sharded, tmp_path, capsys):
    model, base_dir, tuned, delta = sharded
    assert main(["merge", str(base_dir), str(delta), str(tmp_path / "cli_out"), "--quiet"]) == 0
    ref = merge(tuned).state_dict()
    for f in (tmp_path / "cli_out").glob("*.safetensors"):
        for k, t in load_file(f).items():
            assert torch.equal(t, ref[k]), k
    assert main(["merge", str(base_dir), str(delta), str(tmp_path / "cli_out")]) == 1
    assert "exists" in capsys.readouterr().err
