"""Our chat-template renderer (portable_infer/text/chat_template.py) against transformers'
``apply_chat_template``: the same template, messages and special tokens give the same string.

A registered family (exporters/architectures: FAMILIES) is an architecture; the chat template
belongs to each checkpoint (tokenizer_config.json or the GGUF's ``tokenizer.chat_template``) and is
copied into the package unchanged. So for each family this test takes a template in the prompt
format of that family's instruct checkpoints, written for this test with the Jinja constructs
those templates rely on (``raise_exception``, ``namespace``, ``strftime_now``, ``tojson`` with
options, slicing, string methods, ``is string``, ``loop.*``, ``trim``), and for the llama family
also SmolLM2's own template (the default model). The checkpoints' own files are not in the
repository.

Families without a template: gpt2 (its checkpoints are base language models; openai-community's
tokenizer_config.json has no chat_template and transformers 5 has no default one).
"""

from __future__ import annotations

import jinja2
import pytest

from exporters.architectures import FAMILIES
from portable_infer.text.chat_template import ChatTemplate
from portable_infer.errors import InvalidArgumentError

from test_chat_template import SMOLLM2_TEMPLATE

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3 = """{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.index0 == ns.last_user and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not message.content.startswith('<tool_response>') %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "system" or message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# block tags on their own lines without whitespace control: relies on trim_blocks / lstrip_blocks
PHI3 = """{% for message in messages %}
    {% if message['role'] == 'system' and message['content'] %}
{{ '<|system|>\n' + message['content'] + '<|end|>' }}
    {% elif message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + '<|end|>' }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n' + message['content'] + '<|end|>' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|assistant|>\n' }}
{% else %}
{{ eos_token }}
{% endif %}
"""

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

# family -> [(name, template, bos_token, eos_token)]
TEMPLATES = {
    "llama": [("smollm2", SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>"),
              ("llama3-instruct", LLAMA3, "<|begin_of_text|>", "<|eot_id|>")],
    "mistral": [("mistral-instruct", MISTRAL, "<s>", "</s>")],
    "qwen2": [("qwen2-instruct", QWEN2, "<|endoftext|>", "<|im_end|>")],
    "qwen3": [("qwen3", QWEN3, "<|endoftext|>", "<|im_end|>")],
    "phi3": [("phi3-instruct", PHI3, "<s>", "<|endoftext|>")],
    "gemma3": [("gemma3-it", GEMMA3, "<bos>", "<eos>")],
}
NO_TEMPLATE = {"gpt2": "base language model: its checkpoints ship no chat template and transformers has no default"}

CONVERSATIONS = {
    "system-user-assistant-user": [
        {"role": "system", "content": "  Answer briefly.\n"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n4 "},
        {"role": "user", "content": "日本語 😀 and {{ not a template }} \n"},
    ],
    "user-only": [{"role": "user", "content": "Hi"}],
    "user-assistant": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
}
DATE = "26 Jul 2024"  # date_string for the Llama 3 template (else strftime_now: the day the test runs)


def test_every_registered_family_is_covered():
    assert set(TEMPLATES) | set(NO_TEMPLATE) == set(FAMILIES), "a family without a chat-template parity case"
    assert not set(TEMPLATES) & set(NO_TEMPLATE)


def _transformers_tokenizer(bos: str, eos: str):
    vocab = {bos: 0, eos: 1, "[UNK]": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    assert hf.special_tokens_map == {"bos_token": bos, "eos_token": eos}  # what our loader passes, no more
    return hf


def _ours(template: str, bos: str, eos: str, messages, add_generation_prompt: bool, **extra) -> str:
    return ChatTemplate(template, {"bos_token": bos, "eos_token": eos}).render(
        messages, add_generation_prompt=add_generation_prompt, date_string=DATE, **extra)


CASES = [(family, name, template, bos, eos)
         for family, entries in TEMPLATES.items() for name, template, bos, eos in entries]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("family,name,template,bos,eos", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_renders_like_transformers(family, name, template, bos, eos, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    theirs = _transformers_tokenizer(bos, eos).apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
        date_string=DATE)
    ours = _ours(template, bos, eos, messages, add_generation_prompt)
    assert ours == theirs
    assert messages[-1]["content"].strip()[:5] in ours  # the conversation really was rendered


@pytest.mark.parametrize("family,name,template,bos,eos",
                         [c for c in CASES if "raise_exception" in c[2]], ids=lambda c: str(c))
def test_both_refuse_the_same_conversation(family, name, template, bos, eos):
    """Two user turns in a row: the template's raise_exception is an InvalidArgumentError here and a
    jinja2 TemplateError in transformers."""
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError):
        _transformers_tokenizer(bos, eos).apply_chat_template(messages, chat_template=template, tokenize=False)
    with pytest.raises(InvalidArgumentError, match="alternate"):
        _ours(template, bos, eos, messages, True)


def test_tools_and_documents_are_defined_as_in_transformers():
    """transformers passes ``tools`` and ``documents`` (None unless given) to every template."""
    template = ("{{ tools is defined }} {{ tools is none }} {{ documents is none }}"
                "{% if tools %}{% for t in tools %} {{ t | tojson(indent=2, sort_keys=true) }}{% endfor %}{% endif %}")
    messages = CONVERSATIONS["user-only"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    hf = _transformers_tokenizer("<s>", "</s>")
    for given in (None, tools):
        theirs = hf.apply_chat_template(messages, chat_template=template, tokenize=False, tools=given)
        assert _ours(template, "<s>", "</s>", messages, False, **({"tools": given} if given else {})) == theirs
        assert theirs.startswith("True " + ("True" if given is None else "False") + " True")
