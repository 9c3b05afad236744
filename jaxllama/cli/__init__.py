"""The `jaxllama` command line (also `python -m jaxllama`).

    main.py      the parser, error handling and the inspection commands (info, logits, tokenize,
                 trace, compare)
    generate.py  generate and chat
"""

from .main import main

__all__ = ["main"]
