"""Text in and out: the GGUF tokenizer (llama.cpp's ids), its pre-tokenizers, and sandboxed chat templates.

    tokenizer.py      Tokenizer built from GGUF metadata, streaming decoder
    pretokenizers.py  llama.cpp's pre-tokenizer regexes per `tokenizer.ggml.pre`
    chat_template.py  `tokenizer.chat_template` rendered in a hardened Jinja sandbox
"""

from .chat_template import ChatTemplateError, render_chat_template
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer

__all__ = ["ChatTemplateError", "StreamDecoder", "Tokenizer", "load_tokenizer", "render_chat_template"]
