"""The tokenizer stored in a GGUF's `tokenizer.ggml.*` metadata, with llama.cpp's semantics.

    tok = jaxllama.load_tokenizer("model.gguf")      # full model or vocab-only GGUF
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)
    for chunk in tok.decode_stream(ids): ...         # holds back partial UTF-8

What is llama.cpp's (src/llama-vocab.cpp) and re-expressed here:
- token attributes from `tokenizer.ggml.token_type`, plus llama.cpp's text-based fixes
  (end-of-generation and fill-in-the-middle tokens become CONTROL, phi-3's right-strip, ...);
- special-token partition: control/user-defined/unknown token texts are cut out of the text,
  longest first; control and unknown ones only with `parse_special`, user-defined ones always;
- `add_special`: BOS/EOS per `add_bos_token`/`add_eos_token` and the vocab type's defaults;
- SentencePiece (`llama`): a space prefix on text that starts the input or follows a special
  token, spaces as U+2581, merges by token score, `<0xXX>` byte fallback;
- BPE (`gpt2`): llama.cpp's pre-tokenizer regexes (see pretokenizers.py), GPT-2 byte-level
  alphabet, merges by rank;
- decoding per token piece as `llama_token_to_piece`, and `llama_detokenize`'s leading-space
  removal and `clean_spaces` pass.

The merging itself runs in the `tokenizers` library (Rust): a BPE model built from the vocab
and merges (for SentencePiece: merges derived from the scores), so 1 MB of text takes well
under a second. By job: vocab.py (attribute bits, the metadata arrays), special.py (end-of-
generation and fill-in-the-middle texts, cutting special tokens out), spm.py (SentencePiece
merges), bpe.py (the byte alphabet), pretokenizers.py (llama.cpp's BPE pre-tokenizer regexes);
this file puts them together.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import GGUFFormatError, InvalidInputError, UnsupportedModelError
from .bpe import bpe_piece
from .pretokenizers import PreTokenizer, bpe_pre_tokenizer
from .special import EOG_TEXTS, FIM_EOG_KEYS, FIM_TEXTS, partition
from .spm import SPM_SPACE, spm_merges
from .vocab import (ATTR_BYTE, ATTR_CONTROL, ATTR_LSTRIP, ATTR_NORMAL, ATTR_RSTRIP, ATTR_UNDEFINED, ATTR_UNKNOWN,
                    ATTR_USER_DEFINED, OTHER_MODELS, SUPPORTED_MODELS, TYPE_TO_ATTR, as_list, is_valid_text, utf8)

class Tokenizer:
    """Encode and decode text exactly as llama.cpp does for this GGUF vocabulary."""

    def __init__(self, metadata: Mapping[str, Any], name: str = "GGUF"):
        self.name = name
        self._piece_cache: dict[tuple[int, bool], bytes] = {}  # (id, special) -> piece, filled by _piece
        md = metadata
        model = md.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in md:
            raise UnsupportedModelError(f"{name}: no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
        if model not in SUPPORTED_MODELS:
            what = OTHER_MODELS.get(model, "this vocabulary type")
            raise UnsupportedModelError(
                f"{name}: tokenizer type {model!r} is not supported ({what}); supported: llama (SentencePiece), gpt2 (BPE)"
            )
        self.model: str = model
        self.is_spm = model == "llama"
        self.pre: PreTokenizer | None = None if self.is_spm else bpe_pre_tokenizer(md.get("tokenizer.ggml.pre"))

        tokens = as_list(md["tokenizer.ggml.tokens"], "tokenizer.ggml.tokens")
        n = len(tokens)
        if n == 0:
            raise GGUFFormatError(f"{name}: tokenizer.ggml.tokens is empty")
        if not all(isinstance(t, str) for t in tokens):
            raise GGUFFormatError(f"{name}: tokenizer.ggml.tokens must be strings")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens: list[str] = tokens
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        if len(self.token_to_id) != n:
            raise GGUFFormatError(f"{name}: tokenizer.ggml.tokens has duplicate entries")
        scores = md.get("tokenizer.ggml.scores")
        self.scores: list[float] = (
            [float(s) for s in as_list(scores, "tokenizer.ggml.scores", n)[:n]] if scores is not None else [0.0] * n
        )
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            attrs = [TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in as_list(types, "tokenizer.ggml.token_type", n)[:n]]
        self._attrs = attrs

        self._init_flags(md)
        self._init_special(md)
        self.chat_template: str | None = md.get("tokenizer.chat_template")
        self.architecture: str | None = md.get("general.architecture")
        self._merges = None if self.is_spm else as_list(md.get("tokenizer.ggml.merges", []), "tokenizer.ggml.merges")
        if not self.is_spm and not self._merges:
            raise UnsupportedModelError(f"{name}: BPE vocabulary without tokenizer.ggml.merges")

    # ---- set-up -------------------------------------------------------------------------

    def _id(self, md: Mapping[str, Any], key: str, default: int | None) -> int | None:
        n = len(self.tokens)
        if default is not None and default >= n:
            default = None
        v = md.get(key)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < n:
            return int(v)
        return default

    def _init_flags(self, md: Mapping[str, Any]) -> None:
        """BOS/EOS ids and the add_bos/add_eos/space-prefix flags, with llama.cpp's defaults."""
        if self.is_spm:
            bos, eos, unk = 1, 2, 0
            add_bos, add_space_prefix, clean = True, True, False
        else:
            assert self.pre is not None
            bos, eos, unk = (11 if self.pre.has_bos else None), 11, None
            add_bos, add_space_prefix, clean = self.pre.add_bos, False, self.pre.clean_spaces
        self.bos_id = self._id(md, "tokenizer.ggml.bos_token_id", bos)
        self.eos_id = self._id(md, "tokenizer.ggml.eos_token_id", eos)
        self.unk_id = self._id(md, "tokenizer.ggml.unknown_token_id", unk)
        self.pad_id = self._id(md, "tokenizer.ggml.padding_token_id", None)
        self.eot_id = self._id(md, "tokenizer.ggml.eot_token_id", None)
        self.eom_id = self._id(md, "tokenizer.ggml.eom_token_id", None)
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_space_prefix))
        self.clean_spaces = clean

    def _init_special(self, md: Mapping[str, Any]) -> None:
        """llama.cpp's text-based attribute fixes, the end-of-generation set, the special cache."""
        attrs, t2i = self._attrs, self.token_to_id
        eog: set[int] = set()
        fim: dict[str, int] = {}
        for key, texts in FIM_TEXTS.items():
            tid = self._id(md, key, None)
            if tid is None:
                found = [t2i[t] for t in texts if t in t2i]
                if found:  # llama.cpp takes the first hit in hash order; we take the lowest id
                    tid = min(found)
                    attrs[tid] |= ATTR_CONTROL
            if tid is not None:
                fim[key] = tid
        for key in FIM_EOG_KEYS:
            if key in fim:
                eog.add(fim[key])
        if self.eot_id is None:
            found = [t2i[t] for t in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                                      "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
                                      "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>") if t in t2i]
            self.eot_id = min(found) if found else None
        if self.eom_id is None and "<|eom_id|>" in t2i:
            self.eom_id = t2i["<|eom_id|>"]
        for text in EOG_TEXTS:
            if text in t2i:
                eog.add(t2i[text])
                attrs[t2i[text]] |= ATTR_CONTROL
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
            if text in t2i:
                attrs[t2i[text]] = ATTR_USER_DEFINED
        for tid in (self.eos_id, self.eot_id, self.eom_id):
            if tid is not None:
                eog.add(tid)
        texts = {self.tokens[i] for i in eog}
        if "<|end|>" in texts and (
            {"<|return|>", "<|call|>"} <= texts or ("<|flush|>" in texts and ({"<|call|>", "<|calls|>"} & texts))
        ):
            end = t2i["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        if "</s>" in texts and ({"<|tool_response>", "<|plamo:eos|>"} & texts):
            eog.discard(t2i["</s>"])
            attrs[t2i["</s>"]] = ATTR_NORMAL
        self.eog_ids: frozenset[int] = frozenset(eog)

        # special tokens, longest text (in bytes) first, as llama.cpp's cache_special_tokens
        special = [i for i, a in enumerate(attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        special.sort(key=lambda i: -len(utf8(self.tokens[i])))
        self._special = special

        model_name = str(md.get("general.name", "")).lower()
        arch = str(md.get("general.architecture", ""))
        pre = str(md.get("tokenizer.ggml.pre", ""))
        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or arch in ("nomic-bert-moe", "jina-bert-v3"):
            if "<mask>" in t2i:
                attrs[t2i["<mask>"]] |= ATTR_LSTRIP
        elif "phi-3" in model_name or "phi3" in model_name:
            for i in special:
                attrs[i] |= ATTR_RSTRIP
            if "</s>" in t2i:
                attrs[t2i["</s>"]] |= ATTR_RSTRIP
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                if text in t2i:
                    attrs[t2i[text]] &= ~ATTR_RSTRIP
        elif "modern-bert" in model_name and "[MASK]" in t2i:
            attrs[t2i["[MASK]"]] |= ATTR_LSTRIP

    @cached_property
    def _engine(self):
        """The `tokenizers` BPE model that does the merging (built on first use)."""
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers

        vocab = self._engine_vocab()  # not kept: ~3 MB that only the engine's construction needs
        if self.is_spm:
            byte_ok = all(f"<0x{b:02X}>" in vocab for b in range(256))
            unk = self.tokens[self.unk_id] if self.unk_id is not None and self.tokens[self.unk_id] in vocab else None
            bpe = models.BPE(vocab=vocab, merges=spm_merges(vocab, self.scores), unk_token=unk, byte_fallback=byte_ok)
            return HFTokenizer(bpe)
        assert self.pre is not None
        # llama.cpp keeps a repeated merge's first rank (dict.fromkeys: the first of equal lines);
        # a merge into a non-token cannot be represented. Comprehensions: a loop took 0.16 s.
        pairs = [(m[:i], m[i + 1:]) for m in dict.fromkeys(self._merges) for i in (m.find(" ", 1),) if i > 0]
        merges = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=self.pre.ignore_merges)
        tok = HFTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in self.pre.regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        return tok

    def _engine_vocab(self) -> dict[str, int]:
        """The vocabulary the merging engine sees: entries of invalid UTF-8 are left out (the
        engine takes only valid text, and no valid input can produce them); they keep their
        ids and bytes for decoding."""
        return {t: i for t, i in self.token_to_id.items() if is_valid_text(t)}

    # ---- basic facts --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        kind = "llama (SentencePiece)" if self.is_spm else f"gpt2 (BPE, pre {self.pre.name})"  # type: ignore[union-attr]
        return f"Tokenizer({kind}, {len(self)} tokens, bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})"

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's `llama_token_attr` bits for one id (ATTR_* constants)."""
        return self._attrs[self._check_id(token_id)]

    def is_control(self, token_id: int) -> bool:
        return bool(self.token_attr(token_id) & ATTR_CONTROL)

    @property
    def bos_token(self) -> str:
        return self.tokens[self.bos_id] if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.tokens[self.eos_id] if self.eos_id is not None else ""

    def _check_id(self, token_id: Any, what: str = "token id") -> int:
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise InvalidInputError(f"{what}: {token_id!r} is not an integer")
        tid = int(token_id)
        if not 0 <= tid < len(self.tokens):
            raise InvalidInputError(f"{what}: {tid} is outside the vocabulary [0, {len(self.tokens)})")
        return tid

    # ---- encode -------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text: expected str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidInputError(f"text: not valid Unicode ({e.reason} at index {e.start})") from None
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise InvalidInputError("add_special: this vocabulary asks for BOS but has no BOS token")
            out.append(self.bos_id)
        frags = partition(text, parse_special, self._special, self._attrs, self.tokens) if text else []
        raw: list[str] = []
        prev_special = True
        for f in frags:
            if isinstance(f, str):
                if self.is_spm:
                    f = ((" " if self.add_space_prefix and prev_special else "") + f).replace(" ", SPM_SPACE)
                raw.append(f)
                prev_special = False
            else:
                prev_special = True
        encoded = iter(self._encode_raw(raw))
        for f in frags:
            if isinstance(f, str):
                out.extend(next(encoded))
            else:
                out.append(f)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise InvalidInputError("add_special: this vocabulary asks for EOS but has no EOS token")
            out.append(self.eos_id)
        return out

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        eng = self._engine
        batch = getattr(eng, "encode_batch_fast", eng.encode_batch)  # no offset tracking: ~2x faster
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    # ---- decode -------------------------------------------------------------------------

    def _piece(self, tid: int, special: bool = True) -> bytes:
        """One token's piece (llama.cpp's token-to-piece), computed on first use and kept: building
        the whole table up front took ~0.4 s of a chat's time to first token."""
        key = (tid, special)
        piece = self._piece_cache.get(key)
        if piece is None:
            text, attr = self.tokens[tid], self._attrs[tid]
            if attr & (ATTR_UNKNOWN | ATTR_CONTROL) and not special:
                piece = b""  # special=False: control and unknown tokens render as nothing
            elif attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
                piece = utf8(text)
            elif attr & ATTR_NORMAL:
                piece = utf8(text.replace(SPM_SPACE, " ")) if self.is_spm else bpe_piece(text)
            elif attr & ATTR_BYTE:
                piece = bytes([int(text[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else b""
            else:  # unused / undefined tokens render as nothing
                piece = b""
            self._piece_cache[key] = piece
        return piece

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token stands for (llama.cpp's `llama_token_to_piece`, lstrip 0)."""
        return self._piece(self._check_id(token_id), special)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise InvalidInputError("ids: expected a sequence of token ids, got a string")
        try:
            seq = list(ids)
        except TypeError:
            raise InvalidInputError(f"ids: expected a sequence of token ids, got {type(ids).__name__}") from None
        for k, t in enumerate(seq):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise InvalidInputError(f"ids: element {k} ({t!r}) is not an integer token id")
            if not 0 <= t < len(self.tokens):
                raise InvalidInputError(f"ids: token id {int(t)} at index {k} is outside the vocabulary [0, {len(self.tokens)})")
        return [int(t) for t in seq]

    def decode_bytes(self, ids: Iterable[int], special: bool = True, remove_special: bool = False) -> bytes:
        """The raw bytes of `llama_detokenize(ids, remove_special, unparse_special=special)`."""
        seq = self._check_ids(ids)
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and seq and seq[0] == self.bos_id:
            remove_space = False
            seq = seq[1:]
        if remove_special and self.add_eos and seq and seq[-1] == self.eos_id:
            seq = seq[:-1]
        if not seq:
            return b""
        first = self._piece(seq[0], special)
        if remove_space and first[:1] == b" ":
            first = first[1:]
        data = first + b"".join(self._piece(t, special) for t in seq[1:])
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data

    def decode(self, ids: Iterable[int], special: bool = True, remove_special: bool = False) -> str:
        """Text of `ids` as llama.cpp detokenizes it. `special=False` drops control tokens' text;
        `remove_special` drops a leading BOS / trailing EOS the vocab would add. Invalid UTF-8
        becomes U+FFFD."""
        return self.decode_bytes(ids, special, remove_special).decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = True) -> StreamDecoder:
        """An incremental decoder: feed ids one at a time, get only complete characters back."""
        return StreamDecoder(self, special)

    def decode_stream(self, ids: Iterable[int], special: bool = True) -> Iterator[str]:
        """Yield text as `ids` arrive; partial UTF-8 sequences wait for the bytes that complete them."""
        dec = self.stream_decoder(special)
        for t in ids:
            chunk = dec.push(t)
            if chunk:
                yield chunk
        tail = dec.flush()
        if tail:
            yield tail

    # ---- chat ---------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render the GGUF's `tokenizer.chat_template` (or `template`) in a Jinja sandbox.

        A file without one gets llama.cpp's built-in format for its architecture, where llama.cpp
        has one (`chat_template.BUILTIN_TEMPLATES`); otherwise `ChatTemplateError`.
        """
        from .chat_template import BUILTIN_TEMPLATES, ChatTemplateError, render_chat_template

        tpl = template if template is not None else self.chat_template
        if tpl is None:
            tpl = BUILTIN_TEMPLATES.get(self.architecture)
        if tpl is None:
            raise ChatTemplateError(f"{self.name}: no chat template (tokenizer.chat_template)")
        kwargs.setdefault("bos_token", self.bos_token)
        kwargs.setdefault("eos_token", self.eos_token)
        if self.unk_id is not None:
            kwargs.setdefault("unk_token", self.tokens[self.unk_id])
        if self.pad_id is not None:
            kwargs.setdefault("pad_token", self.tokens[self.pad_id])
        return render_chat_template(tpl, messages, add_generation_prompt=add_generation_prompt, **kwargs)


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's detokenizer clean-up (clean_up_tokenization_spaces), its three passes."""
    data = re.sub(rb" ([?!.,])", rb"\1", data)  # " ?", " !", " .", " ,"
    data = data.replace(b" ' ", b"'")  # a single apostrophe between spaces
    return re.sub(rb" '(?=[sm]|re|ve)", b"'", data)  # " 's", " 'm", " 're", " 've"


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text that is complete so far; bytes of
    a UTF-8 sequence split across tokens are held back until it completes, and invalid bytes
    become U+FFFD. `flush()` ends the stream. The concatenation equals `decode` for
    vocabularies without `clean_spaces` (llama.cpp's streaming path does not clean spaces either)."""

    def __init__(self, tokenizer: Tokenizer, special: bool = True):
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def push(self, token_id: int) -> str:
        piece = self._tok.token_to_piece(token_id, self._special)
        if self._first:
            self._first = False
            if self._tok.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence becomes U+FFFD); resets the decoder."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._first = True
        return tail


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a GGUF (a full model or a vocab-only file); None for the default model."""
    from ..gguf.default_model import default_model_path
    from ..gguf.reader import read_gguf

    p = default_model_path() if path is None else path
    return Tokenizer(read_gguf(p).metadata, name=str(p))
