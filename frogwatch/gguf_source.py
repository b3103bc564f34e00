"""GGUF checkpoints (llama.cpp's format) -> layer matrices, one tensor dequantised at a time.

Read with the ``gguf`` package (llama.cpp's ``gguf-py``; ``pip install 'frogwatch[gguf]'``):
``gguf.GGUFReader`` memory-maps the file and parses its header; each matrix's loader dequantises
only its own tensor (``gguf.quants.dequantize``, to float32), so a quantised model is analysed with
one dequantised matrix per worker in memory. See docs/method.md#gguf-input.

* **Shapes.** GGUF lists a tensor's dimensions fastest-varying first (``ne[0]`` = the input
  size of a linear map); the data is row-major in the reversed order, so the matrix is
  ``reversed(ne)`` = (out, in), as ``nn.Linear``'s weight: no transpose is needed.
* **Names.** GGUF renames tensors (``blk.3.attn_q.weight``). The ``gguf`` package's own
  ``TensorNameMap`` for the file's ``general.architecture`` and block count lists, for each GGUF
  name, every source name it knows (one per model family); frogwatch picks the Hugging Face
  ``transformers`` one (:data:`HF_PREFERENCE`) so that ``compare(original, "model.gguf")`` and
  ``distances`` match layers by name. Names the map does not know stay as they are.
* **Q/K rows.** llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` of ``llama``
  models (per head, the rotary halves are interleaved). A row permutation leaves the singular
  values, hence every spectral metric, unchanged, but not element-wise distances; frogwatch undoes
  it for ``general.architecture == "llama"`` using the file's head counts.
* **GPT-2.** Its Hugging Face ``Conv1D`` weights (in x out) are stored transposed by llama.cpp's
  converter; they are read back as ``conv1d`` matrices, in x out, like the original's.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .sources import LayerMatrix, SourceError, _entries_to_matrices, natural_key

__all__ = ["HF_PREFERENCE", "gguf_matrices", "hf_names"]

INSTALL_HINT = "pip install 'frogwatch[gguf]'"

# Which of the map's candidate names is the Hugging Face one: the first candidate (in the map's own
# order) under the first matching entry. An entry ending in "." is a prefix, else an exact name
# (the head sits outside the body's prefix and must not match "lm_head.ln" & co).
# Architectures not listed use the decoder-LLM convention of transformers ("model.layers.N...").
_DECODER = ("model.layers.", "lm_head", "model.")
HF_PREFERENCE: dict[str, tuple[str, ...]] = {
    "bert": ("encoder.layer.", "embeddings."),
    "gpt2": ("transformer.h.", "lm_head", "transformer."),
    "gptneox": ("gpt_neox.layers.", "embed_out", "gpt_neox."),
    "falcon": ("transformer.h.", "lm_head", "transformer."),
    "bloom": ("transformer.h.", "lm_head", "transformer."),
}

# Architectures whose llama.cpp converter interleaves the rotary halves of the q/k rows.
_PERMUTED_QK = {"llama"}
# GPT-2's Hugging Face Conv1D weights (in x out), which llama.cpp's converter transposes to (out, in):
# read back as conv1d, in x out, so that element-wise distances to the original line up.
_CONV1D = {"gpt2": re.compile(r"blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)")}


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise SourceError(f"reading .gguf files needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def _field(reader: Any, key: str) -> Any:
    """A scalar or string metadata value, or None."""
    f = reader.fields.get(key)
    if f is None or not f.types:
        return None
    value = f.parts[f.data[0]] if f.data else None
    if value is None:
        return None
    if f.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value[0].item() if len(value) == 1 else None


def _rank(name: str, preference: tuple[str, ...]) -> int:
    for i, p in enumerate(preference):
        if name.startswith(p) if p.endswith(".") else name == p:
            return i
    return len(preference)


def hf_names(arch: str, n_blocks: int, gguf_names: list[str]) -> dict[str, str]:
    """Map GGUF tensor names (without ``.weight``/``.bias``) back to Hugging Face names.

    Parameters
    ----------
    arch : str
        ``general.architecture`` (``llama``, ``bert``...).
    n_blocks : int
        ``{arch}.block_count``.
    gguf_names : list of str
        Names to map, e.g. ``blk.0.attn_q``.

    Returns
    -------
    dict
        ``{gguf_name: hf_name}``; a name the package's map does not know maps to itself.
    """
    gguf = _import_gguf()
    members = [a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch]
    if not members:  # an architecture newer than the installed gguf: names stay as they are
        return {n: n for n in gguf_names}
    candidates: dict[str, list[str]] = defaultdict(list)
    for source, (_, target) in gguf.TensorNameMap(members[0], n_blocks).mapping.items():
        if source != target:
            candidates[target].append(source)
    preference = HF_PREFERENCE.get(arch, _DECODER)
    out = {}
    for n in gguf_names:
        cands = candidates.get(n)
        # min is stable: among equally preferred candidates the map's own order decides
        out[n] = min(cands, key=lambda c: _rank(c, preference)) if cands else n
    return out


def _unpermute_rows(W: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: rows (head, pair, half) -> (head, half, pair)."""
    rows = W.shape[0]
    return W.reshape(n_head, rows // n_head // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _loader(path: Path, tensor: Any, n_head: int | None, transpose: bool) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from gguf import quants  # looked up per call: one tensor dequantised per load

        try:
            W = quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise SourceError(
                f"{path}: could not dequantise tensor {tensor.name} "
                f"({tensor.tensor_type.name}): {type(e).__name__}: {e}"
            ) from None
        W = np.array(W, dtype=np.float32, copy=True)  # off the read-only memory map
        if n_head is not None:
            W = _unpermute_rows(W, n_head)
        return torch.from_numpy(np.ascontiguousarray(W.T) if transpose else W)

    return load


def gguf_matrices(path: Path) -> list[LayerMatrix]:
    """The weight matrices of a ``.gguf`` file, named as in the Hugging Face original.

    Parameters
    ----------
    path : Path
        A GGUF file (any version the installed ``gguf`` package reads).

    Returns
    -------
    list of LayerMatrix
        2-D tensors (and 4-D convolutions) ending in ``.weight``, in natural name order; shapes
        (out, in); ``load()`` dequantises that tensor to float32. 1-D tensors and 3-D expert
        stacks are skipped.

    Raises
    ------
    SourceError
        ``gguf`` is not installed, or the file is not a readable GGUF file.
    """
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors with varied messages
        msg = " ".join(str(e).split())[:200]
        raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {msg})") from None
    arch = _field(reader, "general.architecture") or ""
    tensors = [t for t in reader.tensors if t.name.endswith(".weight") and len(t.shape) in (2, 4)]
    blocks = [int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))]
    n_blocks = _field(reader, f"{arch}.block_count") or (max(blocks) + 1 if blocks else 0)
    names = hf_names(arch, int(n_blocks), [t.name[: -len(".weight")] for t in tensors])
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    entries, conv1d = [], set()
    for t in tensors:
        short = t.name[: -len(".weight")]
        heads = None
        if arch in _PERMUTED_QK and n_head and re.fullmatch(r"blk\.\d+\.attn_[qk]", short):
            heads = int(n_head if short.endswith("attn_q") else n_head_kv)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        transpose = arch in _CONV1D and bool(_CONV1D[arch].fullmatch(short)) and len(shape) == 2
        if transpose:
            shape = shape[::-1]
            conv1d.add(names[short])
        entries.append((names[short] + ".weight", shape, _loader(path, t, heads, transpose), None))
    entries.sort(key=lambda e: natural_key(e[0]))
    out = [replace(lm, layer_type="conv1d") if lm.name in conv1d else lm
           for lm in _entries_to_matrices(entries)]  # fmt: skip
    if not out:
        raise SourceError(f"{path}: the GGUF file holds no 2-D weight tensor")
    return out
