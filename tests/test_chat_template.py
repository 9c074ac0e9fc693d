"""ChatTemplate: Hugging Face chat templates rendered in a jinja2 sandbox, like transformers."""

from __future__ import annotations

import json

import pytest

from portable_infer.text.chat_template import ChatTemplate
from portable_infer.errors import InvalidArgumentError, PackageError

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_user_message_gets_default_system_and_generation_prompt():
    text = ChatTemplate(SMOLLM2_TEMPLATE).render([{"role": "user", "content": "What is 2+2?"}])
    assert text == DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_own_system_message_and_multi_turn_without_generation_prompt():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "日本語 😀"},
    ]
    text = ChatTemplate(SMOLLM2_TEMPLATE).render(messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n日本語 😀<|im_end|>\n"
    )


def test_special_tokens_and_extra_variables_reach_the_template():
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}{{ who }}",
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
    )
    assert template.render([{"role": "user", "content": "a"}], who="!") == "<s>a</s>!"


def test_trim_blocks_lstrip_blocks_and_loopcontrols():
    source = (
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ m.content }}\n"
        "{% endfor %}"
    )
    messages = [{"role": "user", "content": c} for c in "abc"]
    assert ChatTemplate(source).render(messages) == "a\nb\n"


def test_tojson_keeps_non_ascii_and_takes_indent():
    tools = [{"name": "météo", "args": {"ville": "東京"}}]
    template = ChatTemplate("{{ tools | tojson }}|{{ tools | tojson(indent=2) }}")
    compact, indented = template.render([], tools=tools).split("|")
    assert compact == json.dumps(tools, ensure_ascii=False) and "東京" in compact
    assert indented == json.dumps(tools, ensure_ascii=False, indent=2)


def test_strftime_now():
    text = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert text.isdigit() and len(text) == 4


def test_syntax_error_raises_package_error():
    with pytest.raises(PackageError, match="does not compile"):
        ChatTemplate("{% for message in messages %}{{ message['content'] }}")  # no endfor


def test_unknown_filter_raises_package_error():
    with pytest.raises(PackageError):
        ChatTemplate("{{ messages | no_such_filter }}")


def test_raise_exception_raises_invalid_argument():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    )
    with pytest.raises(InvalidArgumentError, match="Conversation must start with user"):
        template.render([{"role": "assistant", "content": "hi"}])


@pytest.mark.parametrize("messages, index", [
    ([{"content": "no role"}], 0),
    ([{"role": "user", "content": "ok"}, {"role": "user"}], 1),
    ([{"role": "user", "content": "ok"}, {"role": 3, "content": "x"}], 1),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": None}], 1),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": "ok"}, "hello"], 2),
])
def test_malformed_message_names_its_index(messages, index):
    with pytest.raises(InvalidArgumentError, match=rf"messages\[{index}\]"):
        ChatTemplate(SMOLLM2_TEMPLATE).render(messages)


def test_messages_must_be_a_list():
    with pytest.raises(InvalidArgumentError, match="messages"):
        ChatTemplate(SMOLLM2_TEMPLATE).render({"role": "user", "content": "hi"})


def test_sandbox_blocks_unsafe_attribute_access():
    # The sandbox turns an unsafe attribute into an undefined value: nothing leaks into the text...
    assert ChatTemplate("{{ ''.__class__ }}").render([]) == ""
    # ...and using it, as an exploit must, fails.
    with pytest.raises(PackageError, match="unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])
    with pytest.raises(PackageError, match="unsafe"):
        ChatTemplate("{{ cycler.__init__.__globals__ }}").render([])


def test_sandbox_is_immutable():
    with pytest.raises(PackageError, match="unsafe"):
        ChatTemplate("{{ messages.append({'role': 'user', 'content': 'x'}) }}").render([])


def test_bad_constructor_arguments():
    with pytest.raises(InvalidArgumentError, match="source"):
        ChatTemplate(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="special_tokens"):
        ChatTemplate("", special_tokens={"bos_token": 1})  # type: ignore[dict-item]
