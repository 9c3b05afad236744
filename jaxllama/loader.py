"""`load()` a GGUF (or a saved parameter file) into a `Model`: a thin handle on config, params and
tokenizer.

The work lives elsewhere: conversion in `gguf.convert`, saved files in `gguf.saved`, the forward
call in `runner`, the activation-quantization emulation in `tracing.actquant`. `Model`'s methods
are one-line doors to them, so notebook users find everything on the object they hold.
"""

from __future__ import annotations

import hashlib
import html
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import runner
from .errors import GGUFFormatError, InvalidInputError
from .gguf import converted
from .gguf.checks import nonfinite_tensors
from .gguf.config import LlamaConfig
from .gguf.convert import Params, check_weights, is_native, params_from_gguf
from .gguf.default_model import resolve_model, sha256_file
from .gguf.reader import read_gguf
from .gguf.saved import is_saved, load_saved, save_params
from .text.tokenizer import Tokenizer


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: `config` (static), `params` (the Flax pytree) and the file's metadata."""

    config: LlamaConfig
    params: Params
    metadata: dict[str, Any] = field(repr=False)
    source: Path
    source_sha256: str | None = field(default=None, repr=False)
    tensor_types: dict[str, str] = field(default_factory=dict, repr=False)
    #: static plan of llama.cpp activation quantization to emulate (see `with_act_quant`)
    act_quant: tuple[tuple[str, str | None], ...] | None = field(default=None, repr=False)
    #: the `("data", "model")` mesh the parameters are placed on (None: one device)
    mesh: Any = field(default=None, repr=False)
    #: the control vector added to the layers' outputs, described for `reproduce` (None: none)
    control: dict | None = field(default=None, repr=False)

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the GGUF the parameters came from (computed once, on first use)."""
        return self.source_sha256 or sha256_file(self.source)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer from this model's GGUF metadata (llama.cpp's ids; built on first use)."""
        return Tokenizer(self.metadata, name=str(self.source))

    @property
    def weights(self) -> str:
        """The weight layout: "native" (GGUF blocks kept), "float32" or "bfloat16"."""
        p = self.params["params"]
        if any(is_native(w) for w in jax.tree.leaves(p, is_leaf=is_native)):
            return "native"
        return str(p["token_embd"]["embedding"].dtype)

    dtype = weights  # its older name

    def _repr_html_(self) -> str:
        """Notebook view: the config and the parameter pytree (rendered by treescope)."""
        import treescope

        name = html.escape(self.metadata.get("general.name", self.source.name))
        head = f"<p><b>{name}</b> ({html.escape(str(self.source))})</p>"
        return head + treescope.render_to_html({"config": self.config, "params": self.params})

    def check_tokens(self, tokens: Sequence[int] | np.ndarray, what: str = "tokens") -> np.ndarray:
        """Validate one sequence of token ids; return it as int32. Raises `InvalidInputError`."""
        return runner.check_tokens(tokens, self.config, what)

    def logits(self, tokens: Sequence[int] | np.ndarray, scan_layers: bool = True) -> np.ndarray:
        """float32 logits `[T, vocab]` of exactly these token ids (no BOS is added)."""
        return runner.logits(self, tokens, scan_layers)

    def logits_batch(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits for sequences of different lengths in one padded, masked forward call."""
        return runner.logits_batch(self, rows)

    def with_act_quant(self, enabled: bool = True) -> "Model":
        """This model, emulating (or not) llama.cpp's activation quantization (`tracing.actquant`)."""
        from .tracing.actquant import with_act_quant

        return with_act_quant(self, enabled)

    def with_control_vector(self, cv: Any, layer_range: tuple[int, int] | None = None) -> "Model":
        """This model with a llama.cpp control vector (`gguf.control_vector.ControlVector`, strengths
        already applied; None removes it) added to each layer's output in `layer_range` (inclusive;
        default every layer but 0), as llama.cpp's `--control-vector-layer-range` does. Every entry
        point (logits, scoring, generation, traces) then runs with it: it is a parameter leaf,
        `params/layers/control` `[n_layer, D]`."""
        from .gguf.control_vector import for_model

        layers = {k: v for k, v in self.params["params"]["layers"].items() if k != "control"}
        control = None
        if cv is not None:
            c = self.config
            added = for_model(cv, c.n_layer, c.d_model, c.arch, layer_range)
            layers["control"] = jnp.asarray(added)
            control = {"sources": list(cv.sources), "layer_range": None if layer_range is None else list(layer_range),
                       "sha256": hashlib.sha256(added.tobytes()).hexdigest()}
        params = {**self.params, "params": {**self.params["params"], "layers": layers}}
        if self.mesh is not None:  # the new leaf joins the others on the mesh (replicated)
            from .parallel.rules import param_shardings

            params = jax.device_put(params, param_shardings(params, self.mesh))
        return replace(self, params=params, control=control)

    def save(self, path: str | os.PathLike) -> Path:
        """Write config, metadata and parameters to one msgpack file for a fast reload (a control
        vector is not part of the model: save without it, apply it after loading)."""
        if self.control is not None:
            raise InvalidInputError("save the model without its control vector (with_control_vector(None)), "
                                    "and apply the vector after loading")
        return save_params(path, self.config, self.params, self.metadata, self.source, self.sha256,
                           self.tensor_types)


def load(model: str | os.PathLike | None = None, weights: str = "auto", dtype: str | None = None,
         mesh: Any = None, vocab: str = "split", allow_nonfinite: bool = False) -> Model:
    """Load a model: a GGUF path, a file written by `Model.save`, or None for the default model.

    `weights` is how matrices and the embedding are held (arithmetic is float32 in every case):
    "auto"/"native" keeps GGUF's quantized blocks (the same values as float32, a quarter of the
    memory, faster decoding; see `gguf/convert.py`), "float32" dequantizes, "bfloat16" rounds
    to bfloat16 (lossy). `dtype` is its older name. With `mesh` (a `jax.sharding.Mesh` with axes
    `("data", "model")`, see `parallel.make_mesh`) the parameters are placed on it by the table in
    `parallel/rules.py` (`vocab`: "split" or "replicated" embedding and output); batches then split
    over "data". A native conversion is kept in the jaxllama cache and read back by later loads
    of the same file (`gguf/converted.py`; `JAXLLAMA_CONVERTED_CACHE=0` turns that off). A file
    whose block scales or float weights hold NaN/Inf is refused, the tensor named
    (`gguf/checks.py`), unless `allow_nonfinite` (then nothing of it is kept). Raises a
    `JaxLlamaError` subclass with a one-line message on bad input.
    """
    weights = check_weights(weights) if dtype is None else check_weights(dtype, "dtype")
    path = resolve_model(model)
    loaded = _load(path, weights, mesh, vocab, allow_nonfinite)
    jax.block_until_ready(loaded.params)
    return loaded


def _load(path: Path, weights: str, mesh: Any, vocab: str, allow_nonfinite: bool = False) -> Model:
    if is_saved(path):
        s = load_saved(path, weights)
        jax.block_until_ready(s.params)
        release_freed_memory()  # the restored file's bytes and the conversion's temporaries
        return Model(s.config, _placed(s.params, s.config, mesh, vocab), s.metadata, s.source, s.source_sha256,
                     s.tensor_types, mesh=mesh)
    f = read_gguf(path)
    config = LlamaConfig.from_gguf(f)
    entry = converted.entry_dir(path, weights, sum(t.nbytes for t in f.tensors.values()), f.stat)
    with converted.locked(entry):  # another process converting this file: wait, then read its entry
        params = kept = converted.load(entry)
        if kept is None:  # not converted before (or not kept: see gguf/converted.py)
            bad = nonfinite_tensors(f)
            if bad and not allow_nonfinite:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise GGUFFormatError(f"{path}: tensor {bad[0]!r}{more} holds NaN or Inf weights or block scales; "
                                      "load(..., allow_nonfinite=True) / --allow-nonfinite keeps them")
            params = jax.block_until_ready(params_from_gguf(f, config, weights))  # its temporaries live until it ran
            if not bad:
                converted.store(entry, params, path)
    release_freed_memory(collect=kept is None)
    types = {name: t.type_name for name, t in f.tensors.items()}
    return Model(config, _placed(params, config, mesh, vocab), f.metadata, path, None, types, mesh=mesh)


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed temporaries (a conversion's, the arrays a kept conversion was read into) back to
    the operating system.

    glibc keeps freed heap memory for reuse, so a process that converted a model stayed ~120 MB
    larger (the default model, native weights) than what it holds; one that read a kept
    conversion, ~50 MB. `malloc_trim` returns it; elsewhere (no glibc) this only collects
    garbage. `collect=False` skips the garbage collection (0.05 s), which a read has no need of.
    """
    import gc

    from .gguf.convert import trim_heap

    if collect:
        gc.collect()
    trim_heap()


def _placed(params: Params, config: LlamaConfig, mesh: Any, vocab: str) -> Params:
    """`params` on `mesh` by the sharding table (unchanged without a mesh)."""
    if mesh is None:
        return params
    from .parallel import shard_params

    return shard_params(params, mesh, config, vocab)
