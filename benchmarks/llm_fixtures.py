"""Random-init Llama-shaped checkpoints for the LLM-scale benchmarks (no download).

    python benchmarks/llm_fixtures.py [--out benchmarks/fixtures] [--which tinyllama tinyllama-4 llama3-8b-slice]

Writes bf16 sharded safetensors with a Hugging Face ``model.safetensors.index.json`` and a
``config.json`` (``transformers.LlamaConfig``) into ``OUT/<name>/`` (gitignored):

- ``tinyllama``: TinyLlama-1.1B shapes (hidden 2048, MLP 5632, 22 blocks, 4 KV heads, vocabulary
  32000, untied head): 156 weight matrices, 2.2 GB.
- ``tinyllama-4``: the same with only the first 4 blocks (30 matrices), for side-by-side runs with
  WeightWatcher.
- ``llama3-8b-slice``: Llama-3-8B shapes (hidden 4096, MLP 14336, 8 KV heads) for one block plus a
  tied 128256 x 4096 embedding: the per-matrix costs of an 8B model.

Names and shapes come from ``LlamaForCausalLM`` built on the meta device; every matrix is drawn
N(0, 0.02) (the config's ``initializer_range``) straight in bf16, one tensor at a time, so building
the 1.1B fixture needs well under 1 GB of memory. A fixture already present is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

FIXTURES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      tie_word_embeddings=False),
    "tinyllama-4": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                        tie_word_embeddings=False),
    "llama3-8b-slice": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            tie_word_embeddings=True),
}  # fmt: skip
SHARD_BYTES = 500 * 2**20
DEFAULT_OUT = Path(__file__).resolve().parent / "fixtures"


def shapes(name: str) -> tuple[dict[str, tuple[int, ...]], object]:
    """Tensor names and shapes of the fixture's ``LlamaForCausalLM`` (tied weights listed once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**FIXTURES[name], torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    seen, out = set(), {}
    for key, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[key] = tuple(p.shape)
    return out, cfg


def write_fixture(name: str, root: Path, seed: int = 0) -> Path:
    """Write fixture ``name`` under ``root/name`` unless its index is already there."""
    from safetensors.torch import save_file

    d = root / name
    if (d / "model.safetensors.index.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tensors, cfg = shapes(name)
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, shape in tensors.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * cfg.initializer_range).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(t.numel() * 2 for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    cfg.save_pretrained(str(d))
    # the index last: its presence marks a complete fixture
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--which", nargs="+", choices=sorted(FIXTURES), default=sorted(FIXTURES))
    args = ap.parse_args()
    for name in args.which:
        d = write_fixture(name, args.out)
        print(d)


if __name__ == "__main__":
    main()
