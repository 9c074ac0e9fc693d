"""Which graph variant of a package an execution provider runs: one rule, in one place.

Every provider (a row of :data:`portable_infer.engine.providers.PROVIDERS`) chooses from the whole package:

1. **What it can run**: variants whose name is in the row's ``variants``, whose precision is in its
   ``precisions``, and whose manifest ``providers`` name it (or ``*``).
2. **What the user allows**, in tiers of KV growth (the paged variant only when ``paged_kv`` asks
   for it, and then only it). ``static_kv=None`` (the default) tries the
   static-KV graphs first, then the growing ones, unless the package carries ORT-format graphs
   (``pack --ort`` packed it for those); ``True``: only static; ``False``: only growing. Within a
   tier, the activations: an int8-activation graph (``static-int8``, ``fused-int8``, their ``-ort``
   copies) takes the place of its exact twin when ``accuracy_level=4`` asks for int8, or by default
   when export verification recorded it past the quality gate (``variants.passes_gate``), or
   when the provider has nothing else in that tier; ``accuracy_level=1`` never runs one. At
   ``accuracy_level=4`` the default static tier counts only when it holds an int8 graph.
3. **What it prefers**: from the first tier with something left, the variant earliest in the row's
   ``variants``, then in its ``precisions``.

So from one package CUDA and the CPU take ``static`` (or ``static-int8``), OpenVINO, DirectML and
every other portable-only provider take ``portable``, and a provider left with nothing is skipped
with the reason :func:`choose_variant` gives. The choices that no provider could honour
(``static_kv=True`` without a static graph, ...) are refused up front by :meth:`VariantChoice.check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from portable_infer.engine.provider_spec import ProviderSpec
from portable_infer.errors import PackageError
from portable_infer.package.manifest import GraphVariant
from portable_infer.package.variants import EXACT_TWINS, FUSED, FUSED_INT8, INT8_FLOOR, ORT_SUFFIX, PAGED, is_int8, is_paged, is_static


def pick_variant(spec: ProviderSpec, variants: Sequence[GraphVariant]) -> GraphVariant | None:
    """The variant ``spec`` prefers (name first, then precision) among those it runs; no tiers."""
    ok = [v for v in variants if spec.accepts(v)]
    return min(ok, key=lambda v: (spec.variants.index(v.name), spec.precisions.index(v.precision)), default=None)


@dataclass(frozen=True)
class VariantChoice:
    """What the user asked for, and which int8 graphs passed the package's quality gate.

    Attributes:
        static_kv: None: static-KV graphs first where the provider runs them; True: only those;
            False: never.
        int8: int8-activation graphs. True (accuracy_level=4): in place of their exact twins;
            False (accuracy_level=1): never; None: those in ``gated``, and any the provider has
            no exact graph beside.
        gated: names of the int8 variants whose recorded agreement passed the gate.
        paged: the paged-KV variant only (serving's mixed steps); False: never it.
    """

    static_kv: bool | None = None
    int8: bool | None = None
    gated: frozenset = frozenset()
    paged: bool = False

    def tiers(self, variants: Sequence[GraphVariant]) -> tuple:
        """The KV growths to try, in order: True = static."""
        if self.static_kv is not None:
            return (self.static_kv,)
        packed = any(v.name.endswith(ORT_SUFFIX) for v in variants)
        return (False,) if packed else (True, False)

    def activations(self, pool: list, auto_static: bool) -> list:
        """``pool`` (one tier of what a provider runs) with the activations asked for."""
        eight = [v for v in pool if is_int8(v)]
        use = self.int8
        if use is None:  # a twin below the gate runs only when the provider has nothing exact here
            use = bool(eight) and (all(v.name in self.gated for v in eight) or len(eight) == len(pool))
        if not use:
            return [v for v in pool if v not in eight]
        if eight:
            return [v for v in pool if v.name not in EXACT_TWINS]
        return [] if auto_static else pool  # explicit static, or portable only (ORT fuses QDQ pairs at 4)

    def constraints(self) -> str:
        """The user's choices, as the reason a provider may have nothing left."""
        out = [f"static_kv={self.static_kv}"] if self.static_kv is not None else []
        out += {True: ["accuracy_level=4 (int8 activations)"], False: ["accuracy_level=1 (float activations)"]
                }.get(self.int8, [])
        return " and ".join(out) or "the default choice (static KV first; int8 activations where gated)"

    def check(self, variants: Sequence[GraphVariant], pkg: str | Path) -> None:
        """Refuse what no provider could honour, with a :class:`PackageError` saying what to do."""
        names = [v.name for v in variants]
        if self.paged and not any(is_paged(v) for v in variants):
            raise PackageError(f"{pkg} has no paged variant; re-export it with "
                               f"`portable-infer export SOURCE -o {pkg} --precision fp16 --variants static,{PAGED}`")
        if self.static_kv and not any(is_static(v) for v in variants):
            raise PackageError(f"{pkg} has no static-KV variant; re-export it with "
                               f"`portable-infer export SOURCE -o {pkg} --variants portable,fused,static`")
        if self.int8 is False and variants and all(is_int8(v) for v in variants):
            raise PackageError(
                f"accuracy_level=1 asks for float activations, and {pkg} has only int8-activation graphs "
                f"({', '.join(names)}); load it with accuracy_level=4 (or None), or re-export it with the "
                f"exact variants: `portable-infer export SOURCE -o {pkg} --precision int4`")
        growing = [v for v in variants if not is_static(v)]
        static_int8 = (self.static_kv is None and True in self.tiers(variants)  # the default tier serves int8
                       and any(is_static(v) and is_int8(v) for v in variants))
        if (self.int8 and self.static_kv is not True and not static_int8 and not any(is_int8(v) for v in growing)
                and any(v.name.startswith(FUSED) for v in growing)):
            raise PackageError(
                f"accuracy_level=4 asks for int8 activations, and {pkg} has no {FUSED_INT8} graph (int4 exports "
                f"keep it unless its agreement falls {1 - INT8_FLOOR[FUSED_INT8]:.0%} below its exact twin's; its fused graph "
                f"keeps the accuracy it was exported with); re-export it with `portable-infer export SOURCE -o {pkg} --precision int4` "
                f"or load it with accuracy_level=1")


def choose_variant(spec: ProviderSpec, variants: Sequence[GraphVariant], choice: VariantChoice = VariantChoice()) -> tuple:
    """(the variant ``spec`` runs, "") or (None, why it has none), by the rule in this module's docstring.

    Args:
        spec: a :class:`~portable_infer.engine.provider_spec.ProviderSpec` (its ``accepts``, ``variants``,
            ``precisions``).
        variants: the whole package's variants (``Manifest.variants``).
        choice: the user's choices and the package's gate.
    Example:
        >>> choose_variant(OPENVINO, [static, fused, portable])[0].name   # doctest: +SKIP
        'portable'
    """
    runnable = [v for v in variants if spec.accepts(v) and is_paged(v) == choice.paged]
    for static in choice.tiers(variants):
        pool = [v for v in runnable if is_static(v) == static]
        v = pick_variant(spec, choice.activations(pool, auto_static=static and choice.static_kv is None))
        if v is not None:
            return v, ""
    have = ", ".join(f"{v.name}/{v.precision}" for v in variants) or "none"
    takes = f"it takes {'/'.join(spec.variants)} in {'/'.join(spec.precisions)}, the package has {have}"
    if not runnable:
        return None, takes
    return None, (f"{takes}; of those it runs {', '.join(v.name for v in runnable)}, none fits "
                  f"{choice.constraints()}")
