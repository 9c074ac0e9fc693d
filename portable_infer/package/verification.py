"""The export's verification report: what was measured for each graph variant, as typed records.

``manifest.json``'s ``verification`` maps a variant's name to a :class:`VariantReport`. The
exporter builds them (``exporters/verify.py`` against transformers, ``exporters/lean_verify.py``
without torch, ``exporters/export.py`` the ``-q4`` weights' fit); the runtime reads them by
attribute (the quality gate, ``variants.passes_gate``; ``portable-infer inspect``). Every field
of a report is optional: each check records what it measured. The JSON form is
:meth:`VariantReport.to_json` (absent fields left out); ``manifest_schema`` types it before
:meth:`VariantReport.from_json` runs.

Schema 1 stored the same measurements as a free-form dict, with agreement as a ratio and a
``"123/128"`` string and the derived perplexity delta beside the perplexities;
:func:`from_schema1` converts such a record. It knows every key an exporter of schema 1 wrote;
``manifest_schema`` refuses any other key (no reader of a schema-1 package ever read one, and
keeping unread keys would carry an untyped corner into the typed report).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LogitDiff:
    """The largest |difference| of a graph's logits from a reference's, and that relative to the
    reference's largest |logit|."""

    max_abs: float
    max_rel: float


@dataclass(frozen=True)
class GreedyPrefix:
    """Greedy decoding through the graph's KV cache against the reference's own greedy tokens."""

    steps: int
    identical_prefix: int  # tokens equal to the reference's before the first difference


@dataclass(frozen=True)
class Consistency:
    """The lean check's invariants of a graph against itself (no reference needed)."""

    cached: LogitDiff  # prefill + cached decode steps vs one pass over the whole sequence
    padded: LogitDiff  # a left-padded row of a batch vs the same tokens alone


@dataclass(frozen=True)
class Quality:
    """Teacher-forced top-1 agreement with a reference along its greedy continuation (and the fixed
    texts, where perplexity is measured), and perplexity on the texts (both or neither of
    ``perplexity`` and ``perplexity_reference``)."""

    agreed: int
    steps: int
    perplexity: float | None = None
    perplexity_reference: float | None = None

    @property
    def top1_agreement(self) -> float:
        return self.agreed / self.steps

    @property
    def perplexity_delta(self) -> float | None:
        """The graph's perplexity relative to the reference's, minus 1 (None: not measured)."""
        if self.perplexity is None or self.perplexity_reference is None:
            return None
        return self.perplexity / self.perplexity_reference - 1

    @property
    def agree_steps(self) -> str:
        return f"{self.agreed}/{self.steps}"


@dataclass(frozen=True)
class WeightFit:
    """The ``-q4`` graphs' weights (``exporters/int4_fit.py``): their form and how far they are
    from the source's."""

    form: str
    lm_head: str
    weights: int  # linear weights fitted
    weights_8bit: int  # of those, fitted at 8 bits (GGUF Q4_1)
    mean_abs_rel: float  # mean |error| relative to the mean |weight|
    mean_shift_rel: float  # mean |block shift| relative to the mean |weight|
    max_abs: float  # the largest |error|
    max_steps: float  # and in steps of the source block


@dataclass(frozen=True)
class VariantReport:
    """What export verification recorded for one graph variant.

    Attributes:
        reference: what the graph was compared with (the lean check names it; None: transformers).
        full: logits of a batch (one row left-padded) in one pass, against the reference.
        cached: the same logits through the KV cache, step by step.
        greedy: greedy decoding through the cache against the reference's.
        consistency: the lean check's invariants (exact graphs).
        quality: agreement (and perplexity) over the whole reference: what the quality gate reads.
        agreement: the lean check's shorter run (the first greedy steps only); never gated on.
        reference_logits: the logits at a shipped reference's top-k ids (lean check).
        weight_fit: the ``-q4`` weights' form and error.
        dropped: why the variant was left out of the package (None: it is in it).
    """

    reference: str | None = None
    full: LogitDiff | None = None
    cached: LogitDiff | None = None
    greedy: GreedyPrefix | None = None
    consistency: Consistency | None = None
    quality: Quality | None = None
    agreement: Quality | None = None
    reference_logits: LogitDiff | None = None
    weight_fit: WeightFit | None = None
    dropped: str | None = None

    def to_json(self) -> dict:
        """The JSON object (a dict) of this report; fields that are None are left out."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_json(cls, d: dict) -> VariantReport:
        """A report from its JSON object, as ``manifest_schema`` checked it (schema 2)."""
        return cls(
            reference=d.get("reference"), full=_opt(LogitDiff, d.get("full")), cached=_opt(LogitDiff, d.get("cached")),
            greedy=_opt(GreedyPrefix, d.get("greedy")),
            consistency=_opt(lambda cached, padded: Consistency(LogitDiff(**cached), LogitDiff(**padded)),
                             d.get("consistency")),
            quality=_opt(Quality, d.get("quality")), agreement=_opt(Quality, d.get("agreement")),
            reference_logits=_opt(LogitDiff, d.get("reference_logits")),
            weight_fit=_opt(WeightFit, d.get("weight_fit")), dropped=d.get("dropped"),
        )


def from_schema1(d: dict) -> VariantReport:
    """A report from a schema-1 record (as ``manifest_schema`` checked it): its agreement
    records hold ``top1_agree_steps`` ("agreed/steps") where schema 2 holds the two integers, and
    the derived ``top1_agreement`` and ``perplexity_delta``, which the typed record computes."""
    converted = dict(d)
    for key in ("quality", "agreement"):
        if key in d:
            q = d[key]
            agreed, steps = (int(n) for n in q["top1_agree_steps"].split("/"))
            converted[key] = {"agreed": agreed, "steps": steps,
                              **{k: q[k] for k in ("perplexity", "perplexity_reference") if k in q}}
    return VariantReport.from_json(converted)


def read_reports(d: dict, schema_version: int) -> dict:
    """``{variant name: VariantReport}`` from a manifest's checked ``verification`` object."""
    read = from_schema1 if schema_version == 1 else VariantReport.from_json
    return {name: read(r) for name, r in d.items()}


def _opt(make, d: dict | None):
    return None if d is None else make(**d)


def _plain(value):
    """A record as its JSON object, unmeasured (None) fields left out."""
    if not dataclasses.is_dataclass(value):
        return value
    return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
