"""The sharding rules: one table from parameter path to `PartitionSpec`, and the placement of a
parameter pytree on a mesh by it.

Megatron layout over the "model" axis. Float kernels are `[L, in, out]`; GGUF blocks (`Blocks`)
keep GGUF's `[L, out, in]` order, their `scale`/`offset` `[L, out, in/block]` split along the
same axis as `q` (so a shard holds whole blocks). The layer axis comes first and is never split.
Paths not in the table (norms, RoPE factors, the activation-quantization `mins`) are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..gguf.config import LlamaConfig
from ..gguf.blocks import ARRAYS, Blocks
from ..gguf.convert import Params
from .mesh import check_model_split, mesh_sizes, native_block
from .placement import Placement

#: split by output columns: each shard computes whole heads (whole KV-head groups) or FFN columns
OUT_SPLIT = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
#: split by input rows: each shard multiplies its heads / FFN columns; the partial sums are all-reduced
IN_SPLIT = ("attn_output", "ffn_down")
NATIVE = ARRAYS

#: The table: '/'-joined parameter path -> PartitionSpec. VOCAB paths follow `vocab=`.
RULES: dict[str, P] = {
    **{f"layers/{n}/kernel": P(None, None, "model") for n in OUT_SPLIT},
    **{f"layers/{n}/kernel/{k}": P(None, "model", None) for n in OUT_SPLIT for k in NATIVE},
    **{f"layers/{n}/bias": P(None, "model") for n in OUT_SPLIT},
    **{f"layers/{n}/kernel": P(None, "model", None) for n in IN_SPLIT},
    **{f"layers/{n}/kernel/{k}": P(None, None, "model") for n in IN_SPLIT for k in NATIVE},
}
#: the embedding and output over the vocabulary (used with vocab="split")
VOCAB_RULES: dict[str, P] = {
    "token_embd/embedding": P("model", None),
    **{f"token_embd/embedding/{k}": P("model", None) for k in NATIVE},
    "output/kernel": P(None, "model"),
    **{f"output/kernel/{k}": P("model", None) for k in NATIVE},
    "output/bias": P("model"),
}
#: Measured on SmolLM2-135M (tied 49152 x 576 embedding) over 4 CPU devices, see the README.
DEFAULT_VOCAB = "split"
VOCAB_CHOICES = ("split", "replicated")


def spec_for(path: str, vocab: str = DEFAULT_VOCAB) -> P:
    """The PartitionSpec of the leaf at '/'-joined `path` (without the leading "params")."""
    if path in RULES:
        return RULES[path]
    if vocab == "split" and path in VOCAB_RULES:
        return VOCAB_RULES[path]
    return P()


def rules_table(vocab: str = DEFAULT_VOCAB) -> list[tuple[str, str]]:
    """(path, spec) rows of the whole table, for the README and `jaxllama inspect`-style output."""
    rows = [(k, str(v)) for k, v in RULES.items()]
    rows += [(k, str(v if vocab == "split" else P())) for k, v in VOCAB_RULES.items()]
    return rows + [("everything else (norms, rope, mins)", str(P()))]


def _path(keys: tuple) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in keys]  # dict keys, `Blocks` fields
    return "/".join(names[1:] if names and names[0] == "params" else names)


def param_shardings(params: Params, mesh: Mesh, vocab: str = DEFAULT_VOCAB) -> Any:
    """A pytree of `NamedSharding`s matching `params`. A vocabulary that the model size does not
    divide is replicated (an uneven split cannot be placed)."""
    _, model = mesh_sizes(mesh)

    def one(keys: tuple, leaf: Any) -> NamedSharding:
        spec = spec_for(_path(keys), vocab)
        for dim, axis in enumerate(spec):
            if axis is not None and leaf.shape[dim] % model:
                spec = P()
                break
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params: Params, mesh: Mesh, config: LlamaConfig, vocab: str = DEFAULT_VOCAB) -> Params:
    """`params` placed on `mesh` by the table, after checking that the mesh can split this model."""
    from ..errors import InvalidInputError

    if vocab not in VOCAB_CHOICES:
        raise InvalidInputError(f"vocab: must be one of {', '.join(VOCAB_CHOICES)}, not {vocab!r}")
    _, model = mesh_sizes(mesh)
    check_model_split(config, model, native_block(params))
    placed = jax.device_put(params, param_shardings(params, mesh, vocab))
    return {**mark_sharded(placed), "placement": Placement(*mesh_sizes(mesh))}


def mark_sharded(node: Any) -> Any:
    """`node` with every `Blocks` marked `sharded`: their products stay XLA's, which the
    partitioner can split, instead of the single-device CPU kernel (`model.native_dense`)."""
    return jax.tree.map(lambda b: b.replace(sharded=True) if isinstance(b, Blocks) else b, node,
                        is_leaf=lambda x: isinstance(x, Blocks))
