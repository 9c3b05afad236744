"""Chat templates: the default model's ChatML renders as its template text says; hostile,
endless, huge or broken templates fail fast with ChatTemplateError and run nothing."""

from __future__ import annotations


import pytest

import jaxllama
from jaxllama.text.chat_template import render_chat_template
from jaxllama.errors import InvalidInputError, JaxLlamaError

ChatTemplateError = jaxllama.ChatTemplateError
USER = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def tok(default_gguf):
    return jaxllama.load_tokenizer(default_gguf)


def test_default_chatml_template(tok):
    # From the template text: a default system turn when the first message is not 'system',
    # then '<|im_start|>{role}\n{content}<|im_end|>\n' per message, then the generation prompt.
    assert "You are a helpful AI assistant named SmolLM" in tok.chat_template
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Grüße 😀"}]
    expected = (system + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                "<|im_start|>user\nGrüße 😀<|im_end|>\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(msgs) == expected + "<|im_start|>assistant\n"
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    assert tok.apply_chat_template(own) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    # the rendered prompt tokenizes into the ChatML control ids with parse_special
    ids = tok.encode(tok.apply_chat_template(own), parse_special=True)
    assert ids.count(tok.token_to_id["<|im_start|>"]) == 3 and ids.count(tok.token_to_id["<|im_end|>"]) == 2


def test_variables_passed(tok):
    tpl = "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}|{{ messages|length }}"
    assert tok.apply_chat_template(USER, template=tpl) == "<|im_start|>|<|im_end|>|True|True|1"
    assert tok.apply_chat_template(USER, add_generation_prompt=False, template=tpl).endswith("|False|True|1")
    assert render_chat_template("{{ messages[0]|tojson }}", [{"role": "user", "content": "é<"}]) == \
        '{"role": "user", "content": "é<"}'
    assert render_chat_template("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                                "{{ m.content }}{% endfor %}", [{"role": "a", "content": "1"}, {"role": "b", "content": "2"}]) == "2"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ lipsum.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ self.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append(1) }}",
    "{% if ''.__class__ %}yes{% endif %}",
])
def test_sandbox_blocks_python_internals(template):
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template(template, USER)


def test_hostile_template_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    template = ("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
                "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, USER)
    assert not marker.exists()


ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_endless_loop_is_stopped_by_the_work_limit():
    """The bound is work, not time: 10,000 steps then a clear error, on any machine."""
    with pytest.raises(ChatTemplateError, match="more than 10,000 template steps"):
        render_chat_template(ENDLESS, USER, time_limit_s=3600, max_steps=10_000)


def test_endless_loop_is_stopped_by_the_deadline_too():
    with pytest.raises(ChatTemplateError, match="longer than 0.05 s"):
        render_chat_template(ENDLESS, USER, time_limit_s=0.05, max_steps=10**12)


def test_a_real_template_is_far_inside_the_work_limit(default_model):
    from jaxllama.text import chat_template

    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(50)]
    text = render_chat_template(default_model.tokenizer.chat_template, messages, max_steps=chat_template.MAX_STEPS // 100)
    assert text.count("<|im_start|>") == 52  # its default system turn, 50 messages, the generation prompt


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxxxxxxxxxx' }}{% endfor %}{% endfor %}",
    "{{ 'a' * 10000000000 }}",
    "{{ 'a'.ljust(10000000000) }}",
    "{{ 'a'|center(10000000000) }}",
    "{{ '%10000000000d' % 1 }}",
    "{{ '%10000000000d'|format(1) }}",
    "{{ '{:>10000000000}'.format(1) }}",
    "{{ 7 ** 100000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}",
])
def test_huge_output_fails_by_a_bound(template):
    """Each is refused by a size or work bound; the deadline is set far away, so it cannot be what stops it."""
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template(template, USER, time_limit_s=3600)
    assert "longer than" not in str(err.value)


def test_raise_exception_carries_message(tok):
    tpl = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate user/assistant") as e:
        tok.apply_chat_template(USER, template=tpl)
    assert isinstance(e.value, JaxLlamaError)


@pytest.mark.parametrize("template, match", [
    ("{% for %}", "syntax error on line 1"),
    ("{% if x %}", "syntax error"),
    ("{{ x.y.z }}", "undefined"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
])
def test_broken_templates(template, match):
    with pytest.raises(ChatTemplateError, match=match) as e:
        render_chat_template(template, USER)
    assert "\n" not in str(e.value)


def test_bad_messages_and_missing_template(llamacpp_vocab_dir):
    with pytest.raises(InvalidInputError):
        render_chat_template("{{ messages }}", "not a list")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        render_chat_template("{{ messages }}", ["not a mapping"])  # type: ignore[list-item]
    spm = jaxllama.load_tokenizer(llamacpp_vocab_dir / "ggml-vocab-llama-spm.gguf")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        spm.apply_chat_template(USER)


@pytest.mark.llamacpp
def test_builtin_gemma_format_equals_llamacpps(gemma3_gguf):
    """A file without a template gets llama.cpp's built-in format for its architecture."""
    import ctypes

    import llama_cpp

    tok = jaxllama.load_tokenizer(gemma3_gguf)
    assert tok.chat_template is None
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    ]
    for messages in conversations:
        arr = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
        for add in (True, False):
            buf = ctypes.create_string_buffer(4096)
            n = llama_cpp.llama_chat_apply_template(b"gemma", arr, len(messages), add, buf, 4096)
            assert tok.apply_chat_template(messages, add) == buf.raw[:n].decode()
