"""``VariantSpec``: how one graph variant is built, as plain data (the form of each op family and
its weights' form). ``spec.py`` makes one per variant, checking each form against the modules that
hold the forms; ``context.LoweringContext`` carries it to the lowerings."""

from __future__ import annotations

from dataclasses import dataclass

from ..weights import WeightForm


@dataclass(frozen=True)
class VariantSpec:
    """How one graph variant is built: the form of each op family, and its weights' form."""

    name: str  # the manifest's variant name
    file: str  # its graph file in the package
    providers: tuple[str, ...]  # the providers the manifest lists for it ("*": any)
    attention: str  # attention.FORMS
    norm: str  # norm.FORMS
    rotary: str  # rotary.FORMS
    projections: str  # linear.PROJECTIONS
    kv: str  # spec.KV_FORMS: the cache grows by Concat, or lives in fixed buffers written in place
    logits: str  # head.POSITION_DIM: which positions get logits
    head: str  # head.HEAD_FORMS: the lm_head's form
    weights: WeightForm
    position_ids: bool = True  # a position_ids input (static graphs derive positions from the lengths)
    next_token: bool = False  # a next_token output: the argmax of the logits, greedy on the device

    @property
    def manifest_attention(self) -> str:
        """The manifest's ``attention``: "masked" or "gqa"."""
        return "masked" if self.attention == "masked" else "gqa"

    @property
    def manifest_logits(self) -> str:
        """The manifest's ``logits``: "all" or "last"."""
        return "all" if self.logits == "all" else "last"
