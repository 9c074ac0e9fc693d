"""docs/serving.md's table of every request field agrees with the server's field table
(``portable_infer/serving/http/fields.py``), row by row: a field added, removed or changed in status in
one and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from portable_infer.serving.http import fields
from portable_infer.serving.http.apierror import show

DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
ROW = re.compile(r"^\s*\| (body|message|content part|stream_options) \| `([^`]+)` \| (both|chat|completions) \| (.+) \|$")
KINDS = {"body": fields.BODY, "message": fields.MESSAGE, "content part": fields.CONTENT_PART,
         "stream_options": fields.STREAM_OPTIONS}


def documented() -> dict:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            kind, name, endpoint, status = m.groups()
            assert (kind, name) not in rows, f"{kind} {name} is listed twice in docs/serving.md"
            rows[(kind, name)] = (endpoint, status)
    return rows


def expected(kind: str, name: str) -> tuple:
    """(endpoint, status) as the table in docs/serving.md writes the field."""
    group = [f for f in KINDS[kind] if f.name == name]
    endpoints = {ep for f in group for ep in (f.endpoints if kind in ("body", "stream_options") else ("chat",))}
    statuses = {f.status for f in group}
    assert len(statuses) == 1, f"{name}: one status per field"
    f = group[0]
    status = f.status + (" (accepted: " + ", ".join(f"`{show(v)}`" for v in f.neutral) + ")"
                         if f.status == fields.UNSUPPORTED and f.neutral else "")
    return ("both" if len(endpoints) == 2 else endpoints.pop()), status


FIELDS = sorted({(kind, f.name) for kind, group in KINDS.items() for f in group})


@pytest.mark.parametrize("kind, name", FIELDS, ids=[f"{k}-{n}" for k, n in FIELDS])
def test_each_field_is_documented_as_it_is(kind, name):
    assert documented().get((kind, name)) == expected(kind, name)


def test_the_doc_lists_no_other_field():
    assert set(documented()) == set(FIELDS)
