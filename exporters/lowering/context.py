"""What every lowering reads: the graph being built, its weights, the model's layout and the
variant's spec (``variant_spec.VariantSpec``), plus the values a graph builds once and several
lowerings share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..architectures.common import DecoderLayout
    from ..graph import GraphBuilder
    from ..weights import WeightStore
    from .variant_spec import VariantSpec


@dataclass
class LoweringContext:
    g: GraphBuilder
    w: WeightStore
    layout: DecoderLayout
    spec: VariantSpec
    _once: dict = field(default_factory=dict, repr=False)

    @property
    def dims(self):
        return self.layout.dims

    @property
    def dtype(self):
        """The activation dtype (np.float32 or np.float16)."""
        return self.w.dtype

    @property
    def kv_type(self) -> int:
        """The activation (and KV) ONNX element type."""
        return self.w.onnx_dtype

    def name(self, role: str, i: int | None = None) -> str | None:
        """The source tensor of an optional ``role`` (layer ``i``), or None where the model lacks it."""
        n = self.layout.names.get(role)
        if n is None:
            return None
        n = n.format(i=i)
        return n if self.w.source.has(n) else None

    def req(self, role: str, i: int | None = None) -> str:
        """A tensor the layout requires; a missing one fails in the source with its name."""
        return self.layout.names[role].format(i=i)

    def once(self, key: str, make: Callable[[], str]) -> str:
        """The graph value ``key``, built by ``make()`` the first time it is asked for."""
        if key not in self._once:
            self._once[key] = make()
        return self._once[key]
