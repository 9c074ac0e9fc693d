"""What a tool-calling request asks for: OpenAI's ``tools``, ``tool_choice`` and
``parallel_tool_calls`` checked into a :class:`ToolPlan`, the grammar that enforces a required or
named call, and the messages that carry calls and their results back into the chat template.

::

    plan_tools(tools, tool_choice, parallel, template, parser)  -> ToolPlan | None ("none": no tools)
      ToolPlan.template_tools   the tools as the chat template's ``tools`` variable (as transformers)
      ToolPlan.constraint       "required" / a named function: a Lark grammar of the format's markers
                                around {"name": one of the tools, "arguments": valid under its
                                parameters schema} (``%json``); a named function exactly once,
                                "required" once or, with parallel calls, more
      ToolPlan.stream(...)      the parser of the reply (:class:`~portable_infer.text.tool_calls.CallStream`)
    call_grammar(fmt, tools, parallel)  that grammar, for each layout of :data:`~.tool_formats.FORMATS`
    template_messages(messages) OpenAI messages -> the template's: an assistant message's calls with
                                their arguments as objects (its content "" when null), ``tool`` results

Every violation is an :class:`InvalidArgumentError` whose ``param`` is the path of the value
(``tools[1].function.parameters``), so the server answers a 400 naming it. A parameters schema
must be a JSON object describing an object; llguidance compiles it only where a grammar enforces
it (``required``, a named function): in ``auto`` mode nothing is enforced, so a schema llguidance
cannot compile is accepted there, as vLLM does (its ``parameters`` is any JSON object).
The Python API over these is :mod:`portable_infer.text.tool_chat`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from portable_infer.decode.constraints import JSON_OPTIONS, Constraint
from portable_infer.errors import InvalidArgumentError
from portable_infer.text.tool_calls import CallStream, ToolFormat, detect_format, special_markers
from portable_infer.text.tool_stream import ChatMessage  # noqa: F401 - re-exported: its former home

CHOICES = ("none", "auto", "required")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def _bad(message: str, param: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, param=param)


def _show(value, limit: int = 60) -> str:
    """A client's value in a message, cut short (a tools list may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _keys(obj, allowed: tuple, where: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise _bad(f"{where} has unknown field {_show(extra[0])}; it takes {', '.join(allowed)}", f"{where}.{extra[0]}")


@dataclass(frozen=True)
class ToolSpec:
    """One offered function: its name, its parameters' JSON schema, and the definition as given."""

    name: str
    parameters: dict
    definition: dict
    param: str = "tools"  # where its parameters are in the request, for errors


def check_tools(tools) -> tuple:
    """OpenAI's ``tools`` as :class:`ToolSpec` objects (each ``{"type": "function", "function":
    {"name", "description"?, "parameters"?, "strict"?}}``; names unique)."""
    if not isinstance(tools, (list, tuple)):
        raise _bad(f'tools must be a list of {{"type": "function", "function": {{...}}}} objects, got '
                   f"{type(tools).__name__}", "tools")
    specs, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"{where} must be an object, got {type(tool).__name__}", where)
        _keys(tool, ("type", "function"), where)
        if tool.get("type") != "function":
            raise _bad(f'{where}.type must be "function" (the only kind of tool), got {_show(tool.get("type"))}',
                       f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function must be an object with a name, got {type(fn).__name__}", f"{where}.function")
        _keys(fn, ("name", "description", "parameters", "strict"), f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _bad(f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {_show(name)}",
                       f"{where}.function.name")
        if name in seen:
            raise _bad(f"{where}.function.name: two tools are named {_show(name)}", f"{where}.function.name")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str) or not isinstance(fn.get("strict", False), bool):
            key = "description" if not isinstance(fn.get("description", ""), str) else "strict"
            raise _bad(f"{where}.function.{key} has the wrong type", f"{where}.function.{key}")
        param = f"{where}.function.parameters"
        specs.append(ToolSpec(name, _parameters(fn.get("parameters"), param), tool, param))
    return tuple(specs)


def _parameters(schema, where: str) -> dict:
    """A tool's parameters schema, checked: a JSON object describing an object (the arguments)."""
    if schema is None:
        return NO_ARGUMENTS
    if not isinstance(schema, dict):
        raise _bad(f"{where} must be a JSON schema object, got {type(schema).__name__}", where)
    try:
        json.dumps(schema, allow_nan=False)  # the chat template writes it out as JSON
    except (TypeError, ValueError) as exc:
        raise _bad(f"{where} must be plain JSON (objects, arrays, strings, finite numbers, booleans, null): "
                   f"{exc}", where) from None
    if schema.get("type", "object") != "object":
        raise _bad(f'{where} must describe an object (type "object": the arguments), got type '
                   f'{_show(schema.get("type"))}', where)
    return schema


def _enforceable(spec: ToolSpec, choice: str) -> None:
    """A forced call's parameters schema must compile: its grammar enforces the arguments."""
    error = Constraint.json_schema(spec.parameters, param=spec.param).compile_error()
    if error:
        raise _bad(f"{spec.param} is not a JSON schema this server can enforce: {error}; "
                   f"tool_choice {choice} enforces a call's arguments with a grammar, so fix the schema (or send "
                   f'tool_choice "auto", which enforces nothing)', spec.param)


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools, what it lets the model do with them, and the reply's format."""

    tools: tuple
    choice: str  # "auto" | "required" | "function"
    function: str | None  # the function a named choice forces
    parallel: bool
    fmt: ToolFormat

    @property
    def template_tools(self) -> list:
        return [t.definition for t in self.tools]

    @property
    def names(self) -> frozenset:
        return frozenset(t.name for t in self.tools)

    def constraint(self, tokenizer=None) -> Constraint | None:
        """The grammar of "required" or a named call (None for "auto": the model chooses)."""
        if self.choice == "auto":
            return None
        tools = [t for t in self.tools if self.function in (None, t.name)]
        return Constraint.grammar(call_grammar(self.fmt, tools, self.parallel, special_markers(self.fmt, tokenizer)),
                                  param="tool_choice")

    def apply(self, params, tokenizer=None):
        """``params`` (SamplingParams) with this plan's constraint; a response_format beside a
        required or named call is an error (the two grammars cannot both hold)."""
        constraint = self.constraint(tokenizer)
        if constraint is None:
            return params
        if params.constraint is not None:
            raise _bad(f"tool_choice {self.choice if self.function is None else repr(self.function)} forces a "
                       f"tool call, which response_format cannot also shape; send one of them", "tool_choice")
        return replace(params, constraint=constraint)

    def stream(self, tokenizer=None, params=None, eos_ids=(), deltas: bool = False) -> CallStream:
        """A parser for one reply to this request (``deltas``: with the pieces of streamed calls)."""
        ends = () if params is None else params.silent_end_ids(eos_ids)
        return CallStream(self.fmt, self.names, tokenizer, () if params is None else params.stop, ends, deltas)


def plan_tools(tools, tool_choice=None, parallel_tool_calls=None, template_source: str | None = None,
               tool_parser: str | None = None) -> ToolPlan | None:
    """The :class:`ToolPlan` of a request, or None when it offers no tools (none given, an empty
    list, or ``tool_choice: "none"``: the tools are not shown to the model).

    ``tool_choice``: "none" | "auto" (the default with tools) | "required" |
    ``{"type": "function", "function": {"name": ...}}`` (that function, called exactly once);
    ``parallel_tool_calls`` (default True): whether a reply may hold more than one call (never for
    a named function); ``tool_parser`` names the format (else it is read from the chat template,
    ``template_source``)."""
    specs = check_tools(tools) if tools is not None else ()
    choice, function = _choice(tool_choice, specs)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad(f"parallel_tool_calls must be true or false, got {_show(parallel_tool_calls)}",
                   "parallel_tool_calls")
    if tool_parser is not None:
        detect_format(None, tool_parser)  # a bad name is an error even when no tools are sent
    if choice == "none" or not specs:
        return None
    fmt = detect_format(template_source, tool_parser)
    for spec in specs:
        if choice == "required" or spec.name == function:
            _enforceable(spec, repr(function) if function else f'"{choice}"')
    # a named function is called exactly once (OpenAI's and vLLM's rule), whatever parallel_tool_calls says
    return ToolPlan(specs, choice, function, parallel_tool_calls is not False and function is None, fmt)


def _choice(tool_choice, specs: tuple) -> tuple:
    if tool_choice is None:
        return ("auto" if specs else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise _bad(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                       f'{{"name": ...}}}}, got {_show(tool_choice)}', "tool_choice")
        if tool_choice == "required" and not specs:
            raise _bad('tool_choice "required" needs tools: send the functions the model may call', "tool_choice")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(fn, dict)
            and set(tool_choice) == {"type", "function"} and set(fn) == {"name"}):
        raise _bad(f'tool_choice as an object must be {{"type": "function", "function": {{"name": ...}}}}, got '
                   f"{_show(tool_choice)}", "tool_choice")
    if fn["name"] not in {s.name for s in specs}:
        raise _bad(f"tool_choice names the function {_show(fn['name'])}, which is not in tools "
                   f"({', '.join(s.name for s in specs) or 'none sent'})", "tool_choice.function.name")
    return "function", fn["name"]


def call_grammar(fmt: ToolFormat, tools: list, parallel: bool, special: dict | None = None) -> str:
    """A Lark grammar (llguidance's dialect) whose sentences are one call to one of ``tools``
    (or, ``parallel``, one or more) written in ``fmt``; arguments valid under the tool's
    parameters schema, JSON written as :data:`~portable_infer.decode.constraints.JSON_OPTIONS` says.
    ``special``: markers that are special tokens, by id (written ``<[id]>``)."""
    special = special or {}

    def lit(text: str) -> str:
        if not text:
            return ""
        return f"<[{special[text]}]>" if text in special else json.dumps(text)

    if fmt.layout == "named":  # the name is plain text before the arguments: one alternative per tool
        calls = " | ".join(f"{lit(fmt.open)} {json.dumps(t.name)} {lit(fmt.mid)} %json "
                           f"{json.dumps({**t.parameters, 'x-guidance': JSON_OPTIONS})}" for t in tools)
        return f"start: {'call+' if parallel else 'call'}\ncall: {calls}\n"
    alternatives = [{"type": "object", "properties": {"name": {"const": t.name}, fmt.args: t.parameters},
                     "required": ["name", fmt.args], "additionalProperties": False} for t in tools]
    one = {"anyOf": alternatives}  # llguidance: one %json with anyOf, not alternatives of several
    if fmt.layout == "array":
        body = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        # Mistral's models write "[TOOL_CALLS] [" as often as "[TOOL_CALLS]["
        return f"start: {lit(fmt.open)} \" \"? %json {json.dumps({**body, 'x-guidance': JSON_OPTIONS})}\n"
    call = f"%json {json.dumps({**one, 'x-guidance': JSON_OPTIONS})}"
    if fmt.layout == "tagged":
        call = " ".join(p for p in (lit(fmt.open), lit(fmt.pad), call, lit(fmt.pad), lit(fmt.close)) if p)
    start = f"call ({lit(fmt.sep)} call)*" if parallel else "call"
    return f"start: {start}\ncall: {call}\n"


def template_messages(messages) -> list:
    """OpenAI chat messages in the form chat templates read (as transformers and vLLM pass them):
    an assistant message's ``tool_calls`` with each call's ``arguments`` as an object and a null
    content as ""; a ``tool`` message's ``tool_call_id`` kept. Other messages are unchanged."""
    if not isinstance(messages, (list, tuple)):
        return messages  # check_messages names the problem
    return [_template_message(m, i) if isinstance(m, dict) and ("tool_calls" in m or m.get("role") == "tool")
            else m for i, m in enumerate(messages)]


def _template_message(m: dict, i: int) -> dict:
    where = f"messages[{i}]"
    out = dict(m)
    if m.get("role") == "tool":
        if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
            raise _bad(f"{where}: a tool message needs the tool_call_id (a string) of the call it answers",
                       f"{where}.tool_call_id")
        return out
    if m.get("role") != "assistant":
        raise _bad(f"{where}.tool_calls: only assistant messages carry tool calls", f"{where}.tool_calls")
    calls = m["tool_calls"]
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls must be a list, got {type(calls).__name__}", f"{where}.tool_calls")
    if out.get("content") is None:
        out["content"] = ""
    out["tool_calls"] = [_template_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    return out


def _template_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise _bad(f"{where} must be an object, got {type(call).__name__}", where)
    _keys(call, ("id", "type", "function"), where)
    fn = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(fn, dict):
        raise _bad(f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}', where)
    _keys(fn, ("name", "arguments"), f"{where}.function")
    if not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
        key = "id" if not isinstance(call.get("id"), str) else "function.name"
        raise _bad(f"{where}.{key} must be a string", f"{where}.{key}")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = None
    if not isinstance(args, dict):
        raise _bad(f"{where}.function.arguments must be a JSON object as text (as the API returned it), got "
                   f"{_show(fn.get('arguments'))}", f"{where}.function.arguments")
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}}
