"""Weights converted and written once for every graph that shares one data file.

The fused, fused-int8, static and static-int8 graphs hold the same weights in the same form (only
their ops and accuracy levels differ). The first graph that needs a weight reads, quantizes (or
transposes) and writes it; the next ones add the very same initializers (the data file holds the
bytes once) without reading or quantizing the source again, and without reading the parts of a
q/k/v or gate/up stack that an earlier graph already emitted. The -q4 graphs share theirs the same
way (``int4_fit.FitCache``, which also records the fit's error).

The portable graph has a data file of its own and another form (DequantizeLinear), but rounds its
float weights exactly as the fused graph does; the two are built side by side and hand the
rounded blocks over (:class:`Handoff`), so each float weight is read and rounded once per export.
"""

from __future__ import annotations


class SharedWeights:
    """The emitted weight records of one shared data file (MatMulNBits, dense, DequantizeLinear),
    and which stacks were possible."""

    def __init__(self):
        self.emitted: dict = {}  # WeightStore key -> (weight_ops record, its initializers)
        self.stacks: dict[str, bool] = {}  # stacked key -> whether the parts' storage formats agreed

    def emit(self, g, key: str, make) -> tuple[object, bool]:
        """(the weight record of ``key``, whether an earlier graph made it): made by ``make()``
        the first time, else the first graph's record with its initializers added to graph ``g``."""
        if key in self.emitted:
            record, protos = self.emitted[key]
            g.initializers.extend(protos)
            return record, True
        start = len(g.initializers)
        record = make()
        self.emitted[key] = (record, g.initializers[start:])
        return record, False


class Handoff:
    """Float weights rounded to nearest once for two graphs built side by side (export.py builds the
    portable graph and the first fused-family one a layer at a time; both round each float weight
    at the same width and block): the first to round a source tensor leaves the blocks here, the
    second takes them instead of reading and rounding the tensor again. ``clear()`` after each
    step drops what was not taken, so about one layer's blocks are held."""

    def __init__(self):
        self._left: dict[tuple, object] = {}  # (tensor name, bits, block, transposed) -> quant.Blocks

    def leave(self, key: tuple, blocks) -> None:
        self._left[key] = blocks

    def take(self, key: tuple):
        """The blocks left under ``key`` (and forgotten), or None."""
        return self._left.pop(key, None)

    def holds(self, names) -> bool:
        """Whether every tensor of ``names`` was left here (rounded from float) at some width."""
        left = {key[0] for key in self._left}
        return all(name in left for name in names)

    def clear(self) -> None:
        self._left.clear()
