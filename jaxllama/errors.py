"""Typed exceptions. Every error the API raises on bad input is a `JaxLlamaError`;
the CLI turns it into one line on stderr and a non-zero exit."""


class JaxLlamaError(Exception):
    """Base class of every error jaxllama raises on bad input or unsupported files."""


class GGUFFormatError(JaxLlamaError, ValueError):
    """The file is not a well-formed GGUF (missing, empty, truncated, corrupt)."""


class UnsupportedModelError(JaxLlamaError):
    """A well-formed GGUF that jaxllama cannot run (architecture, tensor type, missing tensor)."""


class InvalidInputError(JaxLlamaError, ValueError):
    """An argument is out of range (token ids, lengths, options)."""


class ModelDownloadError(JaxLlamaError):
    """The default model could not be fetched or failed its hash check."""
