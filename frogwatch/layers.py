"""One vocabulary for layers: roles, blocks, embeddings and the alpha bands.

Every module that asks "what is this matrix?" asks here, so the answers agree everywhere:

* :func:`layer_role` - the role of a weight matrix in its network (``query``, ``key``, ``value``,
  ``qkv``, ``attn_out``, ``mlp_up``, ``mlp_down``, ``conv``, ``embedding``, ``other``), from its
  qualified name, its ``layer_type`` and, as a fallback, its shape.
* :func:`block_of` / :func:`block_prefix` - the transformer block a name belongs to: the first
  dotted component that is a number (``encoder.layer.3.attention.self.query`` -> block 3, prefix
  ``encoder.layer.3``; ``h.11.mlp.c_fc`` -> 11; ``model.layers.0.self_attn.q_proj`` -> 0;
  ``encoder.block.5.layer.1.DenseReluDense.wi`` -> 5).
* :func:`is_embedding_name` - the embedding rule for a name (used when the storage type cannot
  tell, e.g. a 2-D tensor in a safetensors file).
* ``ALPHA_LOW`` / ``ALPHA_HIGH`` (2 and 6) and :func:`alpha_warning` - the band of well-trained
  layers (README, "The columns, and when to worry"): below 2 over-trained, above 6 under-trained / over-parameterized.

Words: ``layer_type`` is the *storage* type of a matrix (``dense``, ``conv1d``, ``conv2d``,
``embedding``, ``rnn``; :data:`LAYER_TYPES`), ``role`` its *function* in the network
(:data:`ROLES`). This module imports nothing from frogwatch.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

__all__ = [
    "ALPHA_HIGH",
    "ALPHA_LOW",
    "EMBEDDING_NAME",
    "LAYER_TYPES",
    "ROLES",
    "alpha_warning",
    "block_of",
    "block_prefix",
    "is_embedding_name",
    "layer_role",
    "leaf_name",
]

LAYER_TYPES = ("dense", "conv1d", "conv2d", "embedding", "rnn")
ROLES = ("query", "key", "value", "qkv", "attn_out", "mlp_up", "mlp_down", "conv", "embedding", "other")

ALPHA_LOW = 2.0  # alpha below: "over-trained" (very heavy tail)
ALPHA_HIGH = 6.0  # alpha above: "under-trained" / over-parameterized

# The one embedding rule, applied to the last component of a name (``.weight`` stripped): a
# component named like an embedding table. Applying it to the leaf only keeps e.g. DeepSeek's
# ``mlp.shared_experts.up_proj`` a dense matrix.
EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|tok_embeddings|^shared$)", re.IGNORECASE)

# The one block rule: the prefix up to and including the first dotted component that is a number.
_BLOCK = re.compile(r"^(?P<prefix>(?:.*?\.)?(?P<index>\d+))(?:\.|$)")

_FUSED_QKV = {"qkv", "query_key_value", "c_attn", "in_proj", "wqkv", "qkv_proj", "qkv_lin", "to_qkv"}
_QUERY = {"q", "query", "q_proj", "q_lin", "wq", "to_q", "query_proj"}
_KEY = {"k", "key", "k_proj", "k_lin", "wk", "to_k", "key_proj"}
_VALUE = {"v", "value", "v_proj", "v_lin", "wv", "to_v", "value_proj"}
_ATTN_OUT = {"o", "o_proj", "out_proj", "out_lin", "c_proj", "dense", "wo", "proj", "to_out",
             "output", "out"}  # fmt: skip  (only inside an attention module)
_UP = {"fc1", "c_fc", "up_proj", "gate_proj", "gate_up_proj", "w1", "w3", "wi", "wi_0", "wi_1",
       "dense_h_to_4h", "lin1", "fc_in", "intermediate", "up", "gate"}  # fmt: skip
_DOWN = {"fc2", "down_proj", "w2", "dense_4h_to_h", "lin2", "fc_out", "down"}
_ATTN_CTX = re.compile(r"(attn|attention)", re.IGNORECASE)
_MLP_CTX = re.compile(r"(mlp|ffn|feed_forward|feedforward|densereludense|intermediate)", re.IGNORECASE)


def _parts(name: str) -> list[str]:
    parts = [p for p in name.split(".") if p]
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    return parts


def leaf_name(name: str) -> str:
    """Last dotted component of a name, a trailing ``.weight`` ignored (``"h.0.attn.c_attn"``)."""
    parts = _parts(name)
    return parts[-1] if parts else ""


def is_embedding_name(name: str) -> bool:
    """Whether a qualified name (or tensor key) names an embedding table.

    True when the last component (``.weight`` stripped) contains ``embed``, ``wte``, ``wpe`` or
    ``tok_embeddings``, or is ``shared`` (T5): ``embeddings.word_embeddings``, ``transformer.wte``,
    ``model.embed_tokens``, ``tok_embeddings``, ``shared``.
    """
    return bool(EMBEDDING_NAME.search(leaf_name(name)))


def block_prefix(name: str) -> str:
    """Name prefix up to and including its first numeric component (``"encoder.layer.3"``).

    ``""`` when no component is a number (``"pooler.dense"``, ``"lstm.weight_ih_l0[i]"``).
    """
    m = _BLOCK.match(name)
    return m.group("prefix") if m else ""


def block_of(name: str) -> int | None:
    """Index of the transformer block of a name: its first numeric dotted component.

    ``encoder.layer.3.attention.self.query`` -> 3, ``transformer.h.11.mlp.c_fc`` -> 11,
    ``model.layers.0.mlp.down_proj`` -> 0, ``encoder.block.5.layer.1.DenseReluDense.wi`` -> 5,
    ``embeddings.word_embeddings`` -> ``None``.
    """
    m = _BLOCK.match(name)
    return int(m.group("index")) if m else None


def layer_role(name: str, layer_type: str = "dense", shape: Sequence[int] | None = None) -> str:
    """Role of a weight matrix from its name (and, as a fallback, its shape).

    Parameters
    ----------
    name : str
        Qualified module name, e.g. ``encoder.layer.0.attention.self.query``; a trailing
        ``.weight`` is ignored.
    layer_type : str
        frogwatch's ``layer_type`` (``dense``, ``conv1d``, ``conv2d``, ``embedding``, ``rnn``).
    shape : (rows, cols), optional
        The matrix as stored: ``(out, in)`` for ``dense``, ``(in, out)`` for ``conv1d``. Used only
        when the name says nothing: a matrix widening by 2x or more is ``mlp_up``, one narrowing by
        2x or more ``mlp_down``.

    Returns
    -------
    str
        One of :data:`ROLES`.
    """
    if layer_type == "conv2d":
        return "conv"
    parts = _parts(name)
    if layer_type == "embedding" or (parts and EMBEDDING_NAME.search(parts[-1])):
        return "embedding"
    if not parts:
        return "other"
    leaf = parts[-1].lower()
    parent = parts[-2].lower() if len(parts) > 1 else ""
    context = ".".join(parts[:-1])
    in_attn = bool(_ATTN_CTX.search(context))
    if leaf in _FUSED_QKV:
        return "qkv"
    if leaf in _QUERY:
        return "query"
    if leaf in _KEY:
        return "key"
    if leaf in _VALUE:
        return "value"
    if in_attn and (leaf in _ATTN_OUT or parent in ("output", "out_proj", "o")):
        return "attn_out"
    if leaf in _UP or parent == "intermediate":
        return "mlp_up"
    if leaf in _DOWN:
        return "mlp_down"
    if leaf == "wo" or (leaf == "c_proj" and _MLP_CTX.search(context)):
        return "mlp_down"
    if leaf == "dense" and parent == "output":  # BERT: layer.N.output.dense after intermediate
        return "mlp_down"
    if shape is not None and len(shape) == 2 and layer_type in ("dense", "conv1d"):
        out_dim, in_dim = (shape[0], shape[1]) if layer_type == "dense" else (shape[1], shape[0])
        if out_dim >= 2 * in_dim:
            return "mlp_up"
        if in_dim >= 2 * out_dim:
            return "mlp_down"
    return "other"


def alpha_warning(alpha: float) -> str:
    """``"over-trained"`` if alpha < 2, ``"under-trained"`` if alpha > 6, else ``""`` (NaN: ``""``)."""
    if not math.isfinite(alpha):
        return ""
    if alpha < ALPHA_LOW:
        return "over-trained"
    if alpha > ALPHA_HIGH:
        return "under-trained"
    return ""
