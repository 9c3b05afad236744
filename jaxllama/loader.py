"""`load()` a GGUF (or a saved parameter file) into a `Model`: config, parameter pytree, metadata.

A converted model can be saved with `Model.save(path)` (Flax msgpack serialization: plain
data, no pickle) and reloaded with `load(path)` without dequantizing again.
"""

from __future__ import annotations

import dataclasses
import html
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from .config import LlamaConfig
from .default_model import default_model_path, sha256_file
from .errors import GGUFFormatError, InvalidInputError, JaxLlamaError
from .gguf_file import GGUF_MAGIC, read_gguf
from .actquant import act_quant_plan, with_block_mins
from .model import Params, forward_capture_jit
from .params import DTYPES, params_from_gguf
from .tokenizer import Tokenizer
from .recorder import active_recorder

SAVED_FORMAT = "jaxllama-params"
SAVED_VERSION = 1


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

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the GGUF the parameters came from (computed once, on first use)."""
        return self.source_sha256 or sha256_file(self.source)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer from this model's GGUF metadata (llama.cpp's ids; built on first use)."""
        return Tokenizer(self.metadata, name=str(self.source))

    @property
    def dtype(self) -> str:
        return str(self.params["params"]["token_embd"]["embedding"].dtype)

    def _repr_html_(self) -> str:
        """Notebook view: the config and the parameter pytree (rendered by treescope)."""
        import treescope

        head = f"<p><b>{html.escape(self.metadata.get('general.name', self.source.name))}</b> ({html.escape(str(self.source))})</p>"
        return head + treescope.render_to_html({"config": self.config, "params": self.params})

    def check_tokens(self, tokens: Sequence[int] | np.ndarray, what: str = "tokens") -> np.ndarray:
        """Validate one sequence of token ids; return it as int32. Raises `InvalidInputError`."""
        return check_tokens(tokens, self.config, what)

    def with_act_quant(self, enabled: bool = True) -> "Model":
        """This model, emulating (or not) llama.cpp's activation quantization for its weight types.

        For Q4_1/Q5_1 weights the block minimums are read from the GGUF (`self.source`) so the
        Q8_1 block-sum term can be reproduced too (see `actquant`).
        """
        if not enabled:
            return dataclasses.replace(self, act_quant=None)
        plan = act_quant_plan(self.tensor_types, self.config.n_layer)
        params = self.params
        if any(kind == "q8_1" for _, kind in plan):
            params = with_block_mins(params, read_gguf(self.source), plan, self.config.n_layer)
        return dataclasses.replace(self, act_quant=plan, params=params)

    def _run(self, tokens: np.ndarray, valid: np.ndarray | None, scan_layers: bool = True) -> np.ndarray:
        """The jitted forward on `[B, T]` ids, under the active `trace` recorder if there is one."""
        rec = active_recorder()
        spec = rec.spec_for(self.config) if rec else None
        if rec:
            rec.begin_call(np.ones(tokens.shape, bool) if valid is None else valid)
        out, captures = forward_capture_jit(
            self.params,
            jnp.asarray(tokens),
            self.config,
            None if valid is None else jnp.asarray(valid),
            scan_layers=scan_layers,
            probes=spec,
            act_quant=self.act_quant,
        )
        if rec:
            rec.end_call(captures)
        out = np.asarray(out)
        if not np.isfinite(out).all():
            where = "see the recorder's nonfinite()" if rec else "run it under jaxllama.trace() to find where they start"
            warnings.warn(f"logits contain NaN or Inf; {where}", RuntimeWarning, stacklevel=3)
        return out

    def logits(self, tokens: Sequence[int] | np.ndarray, scan_layers: bool = True) -> np.ndarray:
        """float32 logits `[T, vocab]` of exactly these token ids (no BOS is added)."""
        ids = self.check_tokens(tokens)
        return self._run(ids[None], None, scan_layers)[0]

    def logits_batch(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits for sequences of different lengths in one padded, masked forward call."""
        if len(rows) == 0:
            raise InvalidInputError("rows: empty batch")
        checked = [self.check_tokens(r, f"rows[{i}]") for i, r in enumerate(rows)]
        width = max(len(r) for r in checked)
        tokens = np.zeros((len(checked), width), np.int32)
        valid = np.zeros((len(checked), width), bool)
        for i, r in enumerate(checked):
            tokens[i, : len(r)], valid[i, : len(r)] = r, True
        out = self._run(tokens, valid)
        return [out[i, : len(r)] for i, r in enumerate(checked)]

    def save(self, path: str | os.PathLike) -> Path:
        """Write config, metadata and parameters to one msgpack file for a fast reload."""
        blob = {
            "format": SAVED_FORMAT,
            "version": SAVED_VERSION,
            "config": self.config.to_dict(),
            "source": {"path": str(self.source), "sha256": self.sha256},
            "metadata": self.metadata,
            "tensor_types": self.tensor_types,
            "params": jax.tree.map(np.asarray, self.params),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(serialization.msgpack_serialize(blob))
        tmp.replace(path)
        return path


def check_tokens(tokens: Sequence[int] | np.ndarray, c: LlamaConfig, what: str = "tokens") -> np.ndarray:
    """Token ids as int32 after checking: 1-D, non-empty, integers in `[0, vocab)`, fits the context."""
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what}: not a sequence of integers") from None
    if arr.ndim != 1:
        raise InvalidInputError(f"{what}: expected one sequence of ids, got shape {list(arr.shape)}")
    if arr.size == 0:
        raise InvalidInputError(f"{what}: empty token list")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{what}: token ids must be integers, got {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= c.vocab_size))
    if bad.size:
        raise InvalidInputError(
            f"{what}: token id {arr[bad[0]]} at index {bad[0]} is outside [0, {c.vocab_size})"
        )
    if arr.size > c.context_length:
        raise InvalidInputError(f"{what}: {arr.size} tokens exceed the context length {c.context_length}")
    return arr.astype(np.int32)


def load(model: str | os.PathLike | None = None, dtype: str = "float32") -> Model:
    """Load a model: a GGUF path, a file written by `Model.save`, or None for the default model.

    `dtype` ("float32" or "bfloat16") applies to matrices and the embedding of a GGUF.
    Raises a `JaxLlamaError` subclass with a one-line message on any bad input.
    """
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype: must be one of {', '.join(DTYPES)}, not {dtype!r}")
    path = default_model_path() if model is None else Path(model)
    if _is_saved(path):
        return _load_saved(path)
    f = read_gguf(path)
    config = LlamaConfig.from_gguf(f)
    params = params_from_gguf(f, config, dtype)
    types = {name: t.type_name for name, t in f.tensors.items()}
    return Model(config, params, f.metadata, path, None, types)


def _is_saved(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False  # read_gguf reports the problem
    return head != GGUF_MAGIC and path.suffix == ".msgpack"


def _load_saved(path: Path) -> Model:
    try:
        blob = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(blob, dict) or blob.get("format") != SAVED_FORMAT:
            raise GGUFFormatError(f"{path}: not a jaxllama parameter file")
        if blob.get("version") != SAVED_VERSION:
            raise GGUFFormatError(f"{path}: unsupported parameter file version {blob.get('version')!r}")
        config = LlamaConfig.from_dict(blob["config"])
        params = jax.tree.map(jnp.asarray, blob["params"])
        source = blob["source"]
        return Model(
            config, params, blob["metadata"], Path(source["path"]), source["sha256"], blob["tensor_types"]
        )
    except JaxLlamaError:
        raise
    except Exception as e:  # msgpack/structure errors on a damaged file
        raise GGUFFormatError(f"{path}: damaged jaxllama parameter file ({type(e).__name__})") from None

