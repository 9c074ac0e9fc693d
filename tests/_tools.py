"""The tool-calling tests' package and tools: the tiny llama (random weights) with a character
tokenizer that has a newline (Hermes' markers need one; the serving tests' has none) and a
Hermes-style chat template that renders ``tools``, assistant ``tool_calls`` and ``tool`` results.
"""

from __future__ import annotations

from pathlib import Path

from _serving import CHARS, SPECIALS, add_tokenizer

TEMPLATE = (
    "{% if tools %}<s>system: You can call these functions:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Answer with <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] %}<s>assistant: {{ m['content'] }}"
    "{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}\n"
    "{% elif m['role'] == 'tool' %}<s>tool: <tool_response>\n{{ m['content'] }}\n</tool_response>\n"
    "{% else %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}")

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 12}, "exact": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"enum": ["news", "web"]}, "maxItems": 2}},
    "required": ["query", "exact", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def newline_tokenizer():
    """The serving tests' character tokenizer with its last character swapped for a newline."""
    from tokenizers import Tokenizer, decoders, models

    chars = [*CHARS[:-1], "\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def long_tiny_llama(root: Path) -> Path:
    """conftest's tiny llama with a 2,048-token context (tools in a prompt take ~900 characters,
    and this tokenizer makes a token of each), exported as fp32."""
    import torch
    import transformers
    from conftest import TINY_LLAMA, TINY_WEIGHT_SEED

    from exporters.export import export

    torch.manual_seed(TINY_WEIGHT_SEED)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA,
                                                                      "max_position_embeddings": 2048})).eval()
    gen = torch.Generator().manual_seed(TINY_WEIGHT_SEED)
    with torch.no_grad():  # conftest's scale: a clear argmax
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(0.2 * noise) if p.ndim == 1 else p.copy_(0.08 * noise)
    model.save_pretrained(root / "hf")
    return export(root / "hf", root / "pkg", precision="fp32", verify=False)


def tool_package(package: Path, out: Path) -> Path:
    """A copy of ``package`` with the newline tokenizer and the Hermes-style template."""
    return add_tokenizer(package, out, newline_tokenizer(), TEMPLATE)


def questions(rng, n: int) -> list:
    words = ["what", "is", "the", "weather", "in", "paris", "search", "for", "news", "about", "rome", "please"]
    return [" ".join(rng.choice(words, int(rng.integers(2, 8)))) for _ in range(n)]
