"""Special tokens as llama.cpp treats them: the texts it makes end-of-generation or
fill-in-the-middle (CONTROL) whatever the file says, and cutting special-token texts out of the
input before the merging (`partition`, llama.cpp's tokenizer_st_partition)."""

from __future__ import annotations

from .vocab import ATTR_CONTROL, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_UNKNOWN

# Token texts llama.cpp treats as end of generation (and therefore CONTROL), whatever the file says.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
# Fill-in-the-middle texts: llama.cpp marks the one it picks CONTROL when the file names no id.
FIM_TEXTS: dict[str, tuple[str, ...]] = {
    "tokenizer.ggml.fim_pre_token_id": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
                                         "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "tokenizer.ggml.fim_suf_token_id": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
                                         "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "tokenizer.ggml.fim_mid_token_id": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>",
                                         "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
}
FIM_EOG_KEYS = ("tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id")

C_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale: what llama.cpp's lstrip/rstrip remove


def partition(text: str, parse_special: bool, special: list[int], attrs: list[int], tokens: list[str]) -> list[str | int]:
    """Cut the texts of the `special` ids (longest first) out of `text`: strings and ids, in order.
    Control and unknown tokens only with `parse_special`; user-defined ones always."""
    frags: list[str | int] = [text]
    for tid in special:
        attr = attrs[tid]
        if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            continue  # user-defined tokens are matched even without parse_special
        needle = tokens[tid]
        if not any(isinstance(f, str) and needle in f for f in frags):
            continue
        out: list[str | int] = []
        for f in frags:
            if isinstance(f, int) or needle not in f:
                out.append(f)
                continue
            parts = f.split(needle)
            last = len(parts) - 1
            for k, part in enumerate(parts):
                if k > 0:
                    out.append(tid)
                    if attr & ATTR_RSTRIP:
                        part = part.lstrip(C_SPACE)
                if k < last and attr & ATTR_LSTRIP:
                    part = part.rstrip(C_SPACE)
                if part:
                    out.append(part)
        frags = out
    return frags
