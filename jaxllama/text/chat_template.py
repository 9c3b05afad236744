"""Render a GGUF's `tokenizer.chat_template` (Jinja) safely: the template is untrusted input.

It runs in `jinja2.sandbox.ImmutableSandboxedEnvironment` (no `_`-prefixed attributes, no
mutation of lists/dicts, no unsafe callables), with extra bounds so that a hostile template
fails fast with a `ChatTemplateError` instead of hanging or eating memory:

- any access to an unsafe attribute (`__class__`, `__globals__`, `mro`, ...) raises at once
  (jinja's default would quietly render an empty string);
- a work limit (lines of template code executed) and a wall-clock limit, both checked by a trace
  function on every line the template executes; the work limit makes an endless loop fail the
  same way on a fast and a slow machine;
- output limit on the rendered text, and a size check of the template's own variables;
- operators and calls that could allocate huge objects in one C-level step (`'x' * n`,
  `n ** m`, `'%999999999d' % x`, `'a'.ljust(n)`, `|center(n)`, ...) are refused above a bound.

The variables match what Hugging Face and llama.cpp pass: `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `tools`, `documents`, `raise_exception(msg)`, `strftime_now(fmt)`, and
a `tojson` filter that keeps non-ASCII text (as transformers does).
"""

from __future__ import annotations

import contextvars
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from ..errors import JaxLlamaError, InvalidInputError

TIME_LIMIT_S = 2.0
MAX_STEPS = 2_000_000  # lines of template code one render may execute (a chat turn takes thousands)
MAX_OUTPUT_CHARS = 4_000_000
MAX_INT_ARG = 1_000_000  # largest count/width a template may pass to a call or filter
MAX_TEMPLATE_CHARS = 1_000_000


#: Templates for files that carry none, by `general.architecture`: llama.cpp's built-in formats
#: (`llama-chat.cpp`), written as Jinja and rendered in the same sandbox.
BUILTIN_TEMPLATES = {
    # Gemma: roles user/model, a system message merged into the next user turn.
    "gemma3": (
        "{%- set ns = namespace(system='') -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system ~ (m['content'] | trim) -%}"
        "{%- else -%}"
        "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
        "{{ '<start_of_turn>' ~ role ~ '\n' }}"
        "{%- if ns.system and role != 'model' -%}{{ ns.system ~ '\n\n' }}{%- set ns.system = '' -%}{%- endif -%}"
        "{{ (m['content'] | trim) ~ '<end_of_turn>\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
    ),
}


class ChatTemplateError(JaxLlamaError):
    """A chat template is missing, broken, hostile, too slow or too large, or raised an error."""


class _Abort(BaseException):
    """Raised from the trace function; a BaseException so template-side `except Exception` cannot eat it."""


class _TemplateRaised(Exception):
    pass


# The size bound of this render: MAX_OUTPUT_CHARS plus twice the size of the inputs.
_LIMIT: contextvars.ContextVar[int] = contextvars.ContextVar("jaxllama_chat_limit", default=MAX_OUTPUT_CHARS)


def _one_line(text: str, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _check_size(value: Any, what: str) -> None:
    limit = _LIMIT.get()
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > limit:
        raise _Abort(f"{what} grew beyond {limit:,} items")


def _check_args(args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_ARG:
            raise ChatTemplateError(f"chat template: {what} called with {v}, above the limit {MAX_INT_ARG:,}")


_FORMAT_WIDTH = re.compile(r"%[-+ #0*]*(\d+)?(?:\.(\d+))?")
_HUGE_FIELD = re.compile(r"\{[^{}]*\d{7,}[^{}]*\}")


def _check_percent_format(fmt: str) -> None:
    """Refuse printf-style widths/precisions that would allocate a huge string in one step."""
    for width, prec in _FORMAT_WIDTH.findall(fmt):
        if (width and int(width) > MAX_INT_ARG) or (prec and int(prec) > MAX_INT_ARG):
            raise ChatTemplateError("chat template: format width above the limit refused")


def _sandbox_class():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        """ImmutableSandboxedEnvironment that fails loudly and refuses huge single-step allocations."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:  # type: ignore[override]
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > _LIMIT.get():
                        raise ChatTemplateError(f"chat template: repetition to {len(seq) * n:,} items refused")
            elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(left) > 1 and abs(right) * max(abs(int(left)).bit_length(), 1) > 100_000:
                    raise ChatTemplateError(f"chat template: power {left} ** {right} refused (too large)")
            elif operator == "%" and isinstance(left, str):
                _check_percent_format(left)
            result = super().call_binop(context, operator, left, right)
            _check_size(result, "a value")
            return result

        def wrap_str_format(self, value: Any) -> Any:
            fmt = getattr(value, "__self__", None)
            if isinstance(fmt, str) and _HUGE_FIELD.search(fmt):  # '{:>999999999}'.format(...)
                raise ChatTemplateError("chat template: format width above the limit refused")
            return super().wrap_str_format(value)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _check_args(args, kwargs, getattr(__obj, "__name__", "a function"))
            for v in (*args, *kwargs.values()):
                _check_size(v, "an argument")
            result = super().call(__context, __obj, *args, **kwargs)
            _check_size(result, "a value")
            return result

    return Sandbox


def _namespace_class():
    from jinja2.utils import Namespace

    class BoundedNamespace(Namespace):
        """`namespace()` whose attributes cannot grow beyond the size limit (`{% set ns.x = ... %}`)."""

        def __setitem__(self, name: str, value: Any) -> None:
            _check_size(value, f"namespace attribute {name!r}")
            super().__setitem__(name, value)

    return BoundedNamespace


def _guard_filter(fn: Any, name: str) -> Any:
    skip = 2 if hasattr(fn, "jinja_pass_arg") else 1  # (context/environment,) value, then the arguments

    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args[skip:], kwargs, f"filter {name!r}")
        if name == "format" and len(args) >= skip and isinstance(args[skip - 1], str):
            _check_percent_format(args[skip - 1])
        result = fn(*args, **kwargs)
        _check_size(result, "a value")
        return result

    for attr in ("jinja_pass_arg",):  # keep @pass_context / @pass_environment markers
        if hasattr(fn, attr):
            setattr(guarded, attr, getattr(fn, attr))
    return guarded


def _raise_exception(message: Any = "") -> NoReturn:
    raise _TemplateRaised(str(message))


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


@lru_cache(maxsize=1)
def _environment():
    from jinja2.ext import loopcontrols

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    for name, fn in list(env.filters.items()):
        env.filters[name] = _guard_filter(fn, name)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _namespace_class()
    return env


@lru_cache(maxsize=16)
def _compile(template: str):
    return _environment().from_string(template)


def _bounded(gen: Any, deadline: float, max_steps: int) -> str:
    """Drain the render generator under a work limit, a deadline and an output limit."""
    steps = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        if time.monotonic() > deadline:
            raise _Abort("timeout")
        if event == "line" and frame.f_code.co_filename == "<template>":  # the template's own code
            steps += 1
            if steps > max_steps:
                raise _Abort(f"rendering executed more than {max_steps:,} template steps (endless loop?)")
            for v in list(frame.f_locals.values()):
                _check_size(v, "a template variable")
        return tracer

    parts: list[str] = []
    total = 0
    limit = _LIMIT.get()
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        for chunk in gen:
            total += len(chunk)
            if total > limit:
                raise _Abort(f"output exceeds {limit:,} characters")
            parts.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(parts)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    time_limit_s: float = TIME_LIMIT_S,
    max_steps: int = MAX_STEPS,
    **variables: Any,
) -> str:
    """Render `template` for `messages` in the sandbox; every failure is a `ChatTemplateError`."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError

    if not isinstance(template, str):
        raise InvalidInputError(f"chat template: expected a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"chat template: {len(template):,} characters, above the limit {MAX_TEMPLATE_CHARS:,}")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidInputError("messages: expected a list of {'role': ..., 'content': ...} mappings")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"messages[{k}]: expected a mapping with 'role' and 'content', got {type(m).__name__}")
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    variables.setdefault("bos_token", "")
    variables.setdefault("eos_token", "")
    try:
        tpl = _compile(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error on line {e.lineno}: {_one_line(e.message or e)}") from None
    except (TemplateError, RecursionError, MemoryError, ValueError, TypeError) as e:
        raise ChatTemplateError(f"chat template: cannot compile: {_one_line(e)}") from None
    inputs = len(json.dumps([list(messages), variables], default=str, ensure_ascii=False))
    token = _LIMIT.set(MAX_OUTPUT_CHARS + 2 * inputs)
    deadline = time.monotonic() + time_limit_s
    try:
        gen = tpl.generate(messages=list(messages), add_generation_prompt=bool(add_generation_prompt), **variables)
        return _bounded(gen, deadline, max_steps)
    except ChatTemplateError:
        raise
    except _Abort as e:
        if str(e) == "timeout":
            raise ChatTemplateError(f"chat template: rendering took longer than {time_limit_s:g} s (endless loop?)") from None
        raise ChatTemplateError(f"chat template: {e}") from None
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template raised an error: {_one_line(e)}") from None
    except SecurityError as e:
        raise ChatTemplateError(f"chat template: unsafe operation blocked: {_one_line(e)}") from None
    except UndefinedError as e:
        raise ChatTemplateError(f"chat template: undefined value: {_one_line(e)}") from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template: {_one_line(e)}") from None
    except RecursionError:
        raise ChatTemplateError("chat template: recursion too deep") from None
    except MemoryError:
        raise ChatTemplateError("chat template: out of memory while rendering") from None
    except Exception as e:  # TypeError, ZeroDivisionError, OverflowError (range), ... inside the template
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {_one_line(e)}") from None
    finally:
        _LIMIT.reset(token)
