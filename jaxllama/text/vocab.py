"""A GGUF vocabulary's facts as llama.cpp reads them: token attribute bits (`llama_token_attr`),
the vocabulary types, and the arrays of `tokenizer.ggml.*` checked on the way in."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import GGUFFormatError

# llama_token_attr bits (llama.h)
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# tokenizer.ggml.token_type values -> attributes
TYPE_TO_ATTR = {1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED, 5: ATTR_UNUSED, 6: ATTR_BYTE}

SUPPORTED_MODELS = ("llama", "gpt2")
OTHER_MODELS = {
    "bert": "WordPiece (BERT) vocabularies",
    "t5": "Unigram (T5) vocabularies",
    "rwkv": "RWKV vocabularies",
    "plamo2": "PLaMo-2 vocabularies",
    "gemma4": "Gemma-4's SentencePiece-style BPE",
    "hybriddna": "hybrid DNA vocabularies",
    "whitespace": "whitespace-split vocabularies",
    "no_vocab": "files without a vocabulary",
    "none": "files without a vocabulary",
}


def utf8(text: str) -> bytes:
    """A token text's bytes, including invalid UTF-8 kept as surrogate escapes by the GGUF reader."""
    return text.encode("utf-8", "surrogateescape")


def is_valid_text(text: str) -> bool:
    """False for a token text holding invalid UTF-8: no valid input can produce it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def as_list(value: Any, key: str, n: int | None = None) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise GGUFFormatError(f"{key}: expected an array, got {type(value).__name__}")
    if n is not None and len(value) < n:
        raise GGUFFormatError(f"{key}: {len(value)} entries for {n} tokens")
    return list(value)
