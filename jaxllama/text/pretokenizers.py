"""llama.cpp's BPE pre-tokenizers: `tokenizer.ggml.pre` name -> split regexes and flags.

A BPE (`gpt2`) vocabulary is split into words before merging. llama.cpp applies a list of
regexes in order; each one isolates its matches inside the pieces left by the previous ones
(Hugging Face `Split(..., behavior="isolated")`). The regexes below are the ones llama.cpp
uses (src/llama-vocab.cpp, `llm_tokenizer_bpe`), not the original `tokenizer.json` ones: where
llama.cpp rewrote a pattern (e.g. `(?i:'s)` -> `'[sS]`, Unicode case classes as look-aheads) its
version is the reference we must match. They are valid Oniguruma patterns, the engine of the
`tokenizers` library.

Flags per name follow llama.cpp too: `ignore_merges` (a word that is already a token is not
merged further), `clean_spaces` (detokenizer removes the space before `?!.,` etc.), and a default
`add_bos` that the GGUF's `tokenizer.ggml.add_bos_token` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError

# Contractions written without inline flags (llama.cpp's form of `(?i:'s|'t|...)`).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# The GPT-2 word pattern (llama.cpp has a hand-written matcher for exactly this string).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
JAIS2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4))
    + r"|\s{1,2}(?!\S)|\s{1}"
)

# Letters of the scripts DeepSeek-LLM's tokenizer treats as words (cased Latin, Greek, Cyrillic,
# Armenian, Georgian, Cherokee, ... as listed in its tokenizer.json), then punctuation classes.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_CJK_KANA = "[一-龥぀-ゟ゠-ヿ]+"
_ASCII_PUNCT = r'''[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]'''
_CASED_WORDS = (  # llama.cpp's look-ahead form of [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+ etc.
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+%s"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*%s"
)

_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "llama3": (LLAMA3,),
    "jais2": (JAIS2,),
    "deepseek-llm": (
        r"[\r\n]",
        rf"\s?[{_DEEPSEEK_LETTERS}]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        _CJK_HANGUL,
        r"\p{N}+",
    ),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        _CJK_KANA,
        _ASCII_PUNCT + r"[A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "spark2_5": (
        r"\p{N}{1,3}",
        _CJK_KANA,
        _ASCII_PUNCT + r"[A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
        r"\p{N}",
    ),
    "youtu": (
        "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|" + _CJK_KANA,
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
        + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
        + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", GPT2),
    "gpt2": (GPT2,),
    "qwen2": (QWEN2,),
    "qwen35": (QWEN35,),
    "bloom": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
    "chatglm4": (LLAMA3,),
    "viking": (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    "tekken": (
        _CASED_WORDS % ("", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "chameleon": (
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        GPT2,
    ),
    "gpt4o": (
        _CASED_WORDS % (_CONTRACTIONS + "?", _CONTRACTIONS + "?")
        + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "granite-emb-multi": (
        (_CASED_WORDS % (_CONTRACTIONS + "?", _CONTRACTIONS + "?")).replace(r"(?=[\p{L}])", r"(?=[\p{L}\p{M}])")
        + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "seed-coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "ufakzeka": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "laguna": (r"[^\n]+|[\n]+", QWEN2),
    "exaone-moe": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp prepares text for one `tokenizer.ggml.pre` name."""

    name: str
    regexes: tuple[str, ...]
    ignore_merges: bool = False
    clean_spaces: bool = True  # llama.cpp's default for BPE vocabularies
    add_bos: bool = False  # default before `tokenizer.ggml.add_bos_token`
    has_bos: bool = True  # chatglm: llama.cpp ignores the BOS id


def _table() -> dict[str, PreTokenizer]:
    t: dict[str, PreTokenizer] = {}

    def add(names: str, kind: str, **flags: bool) -> None:
        for n in names.split():
            t[n] = PreTokenizer(n, _REGEXES[kind], **flags)

    nc = {"clean_spaces": False}
    add("default", "default")
    add("minicpm5", "minicpm5", ignore_merges=True)
    add("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
        ignore_merges=True, add_bos=True)
    add("deepseek-llm", "deepseek-llm", **nc)
    add("deepseek-coder", "deepseek-coder", **nc)
    add("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", "deepseek-v3", **nc)
    add("spark2_5", "spark2_5", **nc)
    add("youtu", "youtu", ignore_merges=True, **nc)
    add("falcon", "falcon")
    add("mpt", "gpt2")
    add("starcoder refact codeshell exaone minerva-7b mellum2", "starcoder")
    add("command-r smollm", "starcoder", **nc)
    add("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert exaone4 olmo jais"
        " jina-v1-en jina-v2-code roberta-bpe", "gpt2")
    add("trillion granite-docling", "gpt2", **nc)
    add("jais-2", "jais2")
    add("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", "qwen2", **nc)
    add("stablelm2 megrez", "qwen2")
    add("qwen35", "qwen35", **nc)
    add("dbrx smaug-bpe", "llama3")
    add("poro-chat", "bloom", **nc)
    add("viking", "viking", **nc)
    add("bloom gpt3-finnish", "bloom")
    add("chatglm-bpe", "chatglm4", has_bos=False)
    add("glm4 glm5", "chatglm4", has_bos=False, ignore_merges=True)
    add("tekken", "tekken", ignore_merges=True, add_bos=True, **nc)
    add("chameleon", "chameleon", add_bos=True, **nc)
    add("gpt-4o llama4 kanana2 talkie", "gpt4o", **nc)
    add("granite-embed-multi-97m", "granite-emb-multi", ignore_merges=True, **nc)
    add("bailingmoe bailingmoe2 llada-moe", "bailingmoe", **nc)
    add("seed-coder", "seed-coder", **nc)
    add("ufakzeka", "ufakzeka", **nc)
    add("grok-2", "qwen2", **nc)
    add("laguna", "laguna", **nc)
    add("exaone-moe", "exaone-moe")
    add("minimax-m2", "gpt4o", **nc)
    return t


PRE_TOKENIZERS: dict[str, PreTokenizer] = _table()

# Names llama.cpp knows that need more than a regex split; we refuse them rather than guess.
UNSUPPORTED_PRE: dict[str, str] = {
    "kimi-k2": "llama.cpp splits it with a hand-written Han/non-Han matcher, not a regex",
    "afmoe": "llama.cpp groups digits with a custom length-modulo-3 matcher",
    "tiny_aya": "llama.cpp groups digits with a custom matcher, not the tokenizer.json regex",
    "cohere2moe": "llama.cpp groups digits with a custom matcher, not the tokenizer.json regex",
    "superbpe": "its zero-width split pattern has llama.cpp-specific semantics",
    "gemma4": "SentencePiece-style BPE on raw UTF-8 with <0xXX> byte fallback (vocab type 'gemma4')",
    "granite-embed-multi-311m": "SentencePiece-style BPE on raw UTF-8 (llama.cpp's gemma4 path)",
    "sarvam-moe": "SentencePiece-style BPE on raw UTF-8 (llama.cpp's gemma4 path)",
    "whitespace": "a whitespace-only splitter with its own tokenizer session in llama.cpp",
}


def bpe_pre_tokenizer(name: str | None) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` = name (None: 'default')."""
    if name is None or name == "":
        return PRE_TOKENIZERS["default"]
    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    if name in UNSUPPORTED_PRE:
        raise UnsupportedModelError(f"pre-tokenizer {name!r} is not supported: {UNSUPPORTED_PRE[name]}")
    raise UnsupportedModelError(f"unknown pre-tokenizer {name!r} (tokenizer.ggml.pre)")
