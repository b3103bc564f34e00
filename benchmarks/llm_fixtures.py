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
- ``llama-tiny``: 2 small blocks, for dry runs of the benchmark scripts.

Names and shapes are ``LlamaForCausalLM``'s (checked against transformers in
``tests/test_llm_scale.py``); every matrix is drawn
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
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                       tie_word_embeddings=False),
    "llama3-8b-slice": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                            tie_word_embeddings=True),
}  # fmt: skip
FIXTURES["tinyllama-4"] = {**FIXTURES["tinyllama"], "num_hidden_layers": 4}
SHARD_BYTES = 500 * 2**20
INIT_STD = 0.02  # LlamaConfig's initializer_range
DEFAULT_OUT = Path(__file__).resolve().parent / "fixtures"


def shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the fixture, in ``LlamaForCausalLM``'s naming (tied weights once).

    Written out by hand so that the script also runs where transformers is not installed (the GPU
    machine); ``tests``-free check: ``LlamaForCausalLM(LlamaConfig(**FIXTURES[name]))`` on the meta
    device has exactly these state-dict entries.
    """
    c = FIXTURES[name]
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    out["model.norm.weight"] = (h,)
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    return out


def float32_llama(path: str | Path):
    """The fixture at ``path`` as a float32 ``LlamaForCausalLM`` (for WeightWatcher, which does not
    take bf16): built on the meta device, every shard read once and cast, weights tied as the
    config says."""
    import transformers
    from safetensors.torch import load_file

    cfg = transformers.LlamaConfig.from_pretrained(path)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(str(f)).items()})
    m.load_state_dict(sd, assign=True, strict=False)
    if cfg.tie_word_embeddings:
        m.tie_weights()
    return m.eval()


def config_json(name: str) -> dict:
    c = FIXTURES[name]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "initializer_range": INIT_STD, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
            "torch_dtype": "bfloat16", **c}  # fmt: skip


def write_fixture(name: str, root: Path, seed: int = 0) -> Path:
    """Write fixture ``name`` under ``root/name`` unless its index is already there."""
    from safetensors.torch import save_file

    d = root / name
    if (d / "model.safetensors.index.json").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tensors = shapes(name)
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, shape in tensors.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * INIT_STD).to(torch.bfloat16)
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
    (d / "config.json").write_text(json.dumps(config_json(name), indent=1))
    # the index last: its presence marks a complete fixture
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--which", nargs="+", choices=sorted(FIXTURES),
                    default=["tinyllama", "tinyllama-4", "llama3-8b-slice"])
    args = ap.parse_args()
    for name in args.which:
        d = write_fixture(name, args.out)
        print(d)


if __name__ == "__main__":
    main()
