"""Byte-level BPE (`gpt2` vocabularies): GPT-2's byte alphabet and a token's bytes."""

from __future__ import annotations

from .vocab import utf8

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def bpe_piece(text: str) -> bytes:
    """A NORMAL byte-level BPE token's bytes (llama.cpp's `llama_decode_text`)."""
    out = bytearray()
    for ch in text:
        b = _CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:  # not in the byte alphabet: llama.cpp writes a marker naming it
            out += b"[UNK_BYTE_0x" + utf8(ch).hex().encode() + utf8(text) + b"]"
    return bytes(out)
