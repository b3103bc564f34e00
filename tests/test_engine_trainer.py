"""FROG under the Hugging Face Trainer, and the training callbacks (frogwatch/frog/callbacks.py)."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

from frogwatch.frog.callbacks import _compare_fn, record_layer_stats
from frogwatch.frog.layer import effective_weight, frog_layers
from frogwatch.frog.model import merge, prepare

HAS_ANALYZE = importlib.util.find_spec("frogwatch.analyze") is not None


def random_masks(model, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) < frac
            for n, m in model.named_modules() if type(m) is nn.Linear}


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=12, seq=8, vocab=100):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def test_trainer_trains_only_delta(tmp_path):
    transformers = pytest.importorskip("transformers")
    from frogwatch.frog.callbacks import FrogwatchCallback

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    masks = random_masks(model, 0.05)
    assert len(masks) == 2 * 6 + 2  # q, k, v, attn-out, ffn-in, ffn-out per layer; pooler; head
    k = sum(int(m.sum()) for m in masks.values())
    prepare(model, masks, noise_scale=0.01, seed=1)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "frog.delta" not in n}

    cb = FrogwatchCallback(every_n_steps=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable()  # HF's activation checkpointing around each BertLayer
    on = getattr(model, "is_activation_checkpointing", None)
    assert on if on is not None else model.is_gradient_checkpointing
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Toy(), callbacks=[cb])
    trainer.train()

    opt_params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in opt_params) == k
    for n, p in model.named_parameters():
        if "frog.delta" in n:
            assert p.abs().sum() > 0, n  # every delta moved away from its zero init
        else:
            assert torch.equal(p, base[n]), n  # nothing else moved, bit for bit
    assert model.bert.encoder.layer[0].attention.self.query.__class__.__name__ == "FrogLinear"
    from frogwatch.frog.layer import current_step
    assert current_step(model) == 2  # three train-mode forwards: steps 0, 1, 2

    hist = cb.history
    assert sorted(hist["step"].unique()) == [0, 1, 2, 3]
    assert len(hist) == 4 * len(masks)
    assert (hist.loc[hist.step == 0, "delta_norm"] == 0).all()
    assert (hist.loc[hist.step == 3, "delta_norm"] > 0).all()
    assert (cb.comparison is None) == (_compare_fn() is None)
    if cb.comparison is not None:  # frogwatch.compare has landed: ΔW there matches the history
        cmp = cb.comparison.set_index("name")
        final = hist[hist.step == 3].set_index("name")["delta_norm"]
        shared = [n for n in final.index if n in cmp.index]
        assert shared
        for n in shared:
            assert cmp.loc[n, "dW_fro"] == pytest.approx(final[n], rel=1e-5)


def test_record_layer_stats_in_a_plain_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40))
    prepare(model, random_masks(model, 0.1), init_scale=0.05)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    frames = [record_layer_stats(model, 0)]
    for step in (1, 2):
        opt.zero_grad()
        model(torch.randn(16, 48)).pow(2).mean().backward()
        opt.step()
        frames.append(record_layer_stats(model, step, alpha=step == 2))
    last = frames[-1].set_index("name")
    for name, m in frog_layers(model).items():
        dw = effective_weight(m) - m.weight
        assert last.loc[name, "delta_norm"] == pytest.approx(float(dw.norm()), rel=1e-6)
        assert last.loc[name, "relative_delta"] == pytest.approx(
            float(dw.norm() / m.weight.norm()), rel=1e-6)
        assert last.loc[name, "k"] == m.frog_delta.numel() and last.loc[name, "kind"] == "linear"
    assert (frames[1]["delta_norm"] != frames[2]["delta_norm"]).all()
    assert frames[1]["alpha"].isna().all()  # alpha=False
    if HAS_ANALYZE:  # alpha is that of the effective weight, i.e. of the merged model
        from frogwatch.analyze import analyze

        ref = analyze(merge(copy.deepcopy(model)), progress=False).set_index("name")["alpha"]
        for name in last.index:
            a, b = last.loc[name, "alpha"], ref.loc[name]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


def test_record_layer_stats_needs_a_prepared_model():
    with pytest.raises(ValueError, match="no FROG layers"):
        record_layer_stats(nn.Linear(3, 3), 0)
