"""Write a Hugging Face style sharded safetensors checkpoint for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sharded(sd: dict[str, torch.Tensor], root: Path, shards: int = 3) -> Path:
    """``sd`` split round-robin over ``shards`` files plus ``model.safetensors.index.json``.

    Tensor i goes to shard ``i % shards`` (so every shard holds tensors from the whole model, as a
    size-cut checkpoint of a real model does not); returns ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::shards]}
        save_file(part, str(root / fname))
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root
