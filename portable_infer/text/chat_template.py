"""Render a Hugging Face chat template (Jinja) into a prompt string, the way transformers does.

Same environment as ``transformers`` (``apply_chat_template``): a sandbox that forbids unsafe
attribute access and mutation, ``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols``
extension (``{% break %}``), a ``tojson`` filter that keeps non-ASCII text as is, and the globals
``raise_exception`` and ``strftime_now`` that templates rely on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from portable_infer.errors import InvalidArgumentError, PackageError


def _raise_exception(message: str) -> None:
    """Called by templates that reject a conversation (e.g. roles that do not alternate)."""
    raise InvalidArgumentError(f"the chat template rejected the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes and forces ASCII; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError(
            f"messages must be a list of {{'role': str, 'content': str}} dicts, got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InvalidArgumentError(
                    f"messages[{i}] must have a str {key!r}, got {message.get(key)!r} in {dict(message)!r}"
                )


class ChatTemplate:
    """A chat template compiled once, rendered per request.

    Args:
        source: the Jinja text (``chat_template.jinja`` or ``tokenizer_config.json["chat_template"]``).
        special_tokens: template variables such as ``{"bos_token": "<s>", "eos_token": "</s>"}``.

    Raises:
        PackageError: the template does not compile.

    Example:
        >>> ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}").render(
        ...     [{"role": "user", "content": "Hi"}])
        'Hi'
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        if not isinstance(source, str):
            raise InvalidArgumentError(f"source must be the template text (str), got {type(source).__name__}")
        special_tokens = dict(special_tokens or {})
        for name, value in special_tokens.items():
            if not (isinstance(name, str) and isinstance(value, str)):
                raise InvalidArgumentError(f"special_tokens must map str to str, got {name!r}: {value!r}")
        self.source = source
        self.special_tokens = special_tokens
        try:
            self._template = _make_environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise PackageError(
                f"the chat template does not compile: {exc.message} (line {exc.lineno}); "
                "fix the template in the package (chat_template.jinja) or re-export it"
            ) from exc

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` into the prompt text.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: end with the header that starts the assistant's turn.
            **extra: more template variables (``tools``, ``documents``, ...).

        Raises:
            InvalidArgumentError: a message is malformed (the message names its index), or the
                template called ``raise_exception``.
            PackageError: the template failed while rendering (unsafe access, undefined name...).
        """
        _check_messages(messages)
        # transformers always defines tools and documents (None when not given); templates test them
        context = {"tools": None, "documents": None, **self.special_tokens, **extra,
                   "messages": messages, "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return self._template.render(**context)
        except (jinja2.TemplateError, TypeError, LookupError, AttributeError) as exc:
            raise PackageError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from exc
