"""One execution provider as plain data: ``ProviderSpec``, a row of ``providers.PROVIDERS``.

What a row says (ONNX Runtime's name, default options, install hint, which graph variants and
precisions it runs, in its order of preference) and the three questions asked of one row: its
names, whether it runs a variant, whether this ONNX Runtime can have it. ``providers.py`` holds the
table and selects sessions; ``variant_choice.py`` decides which variant a row runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from portable_infer.package.manifest import GraphVariant
from portable_infer.package.variants import PORTABLE


def norm_name(name: str) -> str:
    """A provider name as it is compared: stripped, lower case, "-" -> "_"."""
    return name.strip().lower().replace("-", "_")


def version_tuple(version: str) -> tuple:
    """The leading numbers of "major.minor.patch" ("1.22.0rc1" -> (1, 22, 0))."""
    parts = (re.match(r"\d+", p) for p in str(version).split(".")[:3])
    return tuple(int(m.group()) for m in parts if m)


@dataclass(frozen=True)
class ProviderSpec:
    """One execution provider and how portable_infer uses it."""

    key: str  # our name, e.g. "cuda"
    ort_name: str  # ONNX Runtime's name, e.g. "CUDAExecutionProvider"
    priority: int  # "auto" tries lower numbers first
    device: str
    install_hint: str
    aliases: tuple = ()
    default_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    variants: tuple = (PORTABLE,)  # accepted GraphVariant names, preferred first
    precisions: tuple = ("fp16", "int4", "int8", "fp32")  # accepted precisions, preferred first
    explicit_only: str = ""  # why "auto" never picks it; "" = auto may pick it
    companions: tuple = ()  # ORT names placed between it and CPU for the nodes it cannot run
    # options added for a static-KV graph (CUDA graphs); a session that refuses them is made without
    graph_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    # Kernel switches ONNX Runtime reads from the environment while it makes a session, each a named
    # alternative to making it as is ({name: {variable: value}}): the loader's tuner races them on
    # static-KV graphs (``measure.py``) unless the user set one of the variables.
    session_envs: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    min_ort: str | None = None  # first ONNX Runtime version that has it
    max_ort: str | None = None  # first ONNX Runtime version without it

    def names(self) -> set:
        """Every name that means this provider, normalised (:func:`norm_name`)."""
        return {norm_name(n) for n in (self.key, self.ort_name, *self.aliases)}

    def accepts(self, v: GraphVariant) -> bool:
        """It runs variant ``v``: a name and precision it takes, and ``v`` targets it ("*" or none = any)."""
        targets = not v.providers or "*" in v.providers or any(norm_name(p) in self.names() for p in v.providers)
        return v.name in self.variants and v.precision in self.precisions and targets

    def unsupported_reason(self, ort_version: str) -> str | None:
        """Why this ONNX Runtime version cannot have the provider, or None."""
        v = version_tuple(ort_version)
        if self.max_ort and v >= version_tuple(self.max_ort):
            return f"removed in ONNX Runtime {self.max_ort}"
        if self.min_ort and v < version_tuple(self.min_ort):
            return f"needs ONNX Runtime >= {self.min_ort}"
        return None
