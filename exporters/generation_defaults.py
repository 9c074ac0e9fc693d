"""The source's own sampling defaults, carried into the manifest's ``generation`` (and from there
into ``Model.defaults`` at load).

* HF folders (and Hub ids): ``generation_config.json``, read as transformers reads it. Without
  ``do_sample: true`` transformers decodes greedily and ignores temperature / top-k / top-p, so the
  package does too; with it, an unset value is transformers' default (temperature 1, top-k 50,
  top-p 1). ``repetition_penalty`` applies either way.
* GGUF files: llama.cpp's ``general.sampling.*`` keys (``temp``, ``top_k``, ``top_p``,
  ``penalty_repeat``); a temperature is what turns sampling on, as for llama.cpp's own defaults.

A source without any of these keeps greedy decoding. A value out of range is a SourceError naming
the key and the file; the package is not written with a default it cannot run.
"""

from __future__ import annotations

import json
import math

import numpy as np

from portable_infer.package import manifest as mf
from portable_infer.errors import SourceError

# transformers' GenerationConfig._get_default_generation_params: what do_sample=True uses when unset
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
GGUF_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
             "top_p": "general.sampling.top_p", "repetition_penalty": "general.sampling.penalty_repeat"}
# key -> (check, allowed): the manifest's own ranges (manifest_schema.GENERATION)
_RULES = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_k": (lambda v: v >= 0, "an int >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
}


def generation_defaults(src) -> mf.GenerationDefaults:
    """The manifest's ``generation`` for an opened source (sources.open_source)."""
    if src.kind == "gguf":
        values, where = _from_gguf(src.meta), f"{src.path} (GGUF metadata general.sampling.*)"
    else:
        values, where = _from_hf(src.path / "generation_config.json"), str(src.path / "generation_config.json")
    return mf.GenerationDefaults(**_checked(values, where))


def _from_hf(path) -> dict:
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc}); fix or re-download it",
                          param="generation_config.json", reason="invalid") from exc
    if not isinstance(gen, dict):
        raise SourceError(f"{path} must hold a JSON object, got {type(gen).__name__}; fix or re-download it",
                          param="generation_config.json", reason="invalid")
    out = {}
    if gen.get("do_sample") is True:
        out = {k: gen[k] if gen.get(k) is not None else v for k, v in HF_SAMPLING_DEFAULTS.items()}
    if gen.get("repetition_penalty") is not None:
        out["repetition_penalty"] = gen["repetition_penalty"]
    return out


def _from_gguf(meta: dict) -> dict:
    # float32 in the file: 0.6 reads as 0.6000000238..., kept as the shortest float32 text
    found = {k: float(str(np.float32(v))) if isinstance(v, float) else v
             for k, key in GGUF_KEYS.items() if (v := meta.get(key)) is not None}
    if "temperature" not in found:  # greedy, as without the keys; a repeat penalty still applies
        found = {k: v for k, v in found.items() if k == "repetition_penalty"}
    return found


def _checked(values: dict, where: str) -> dict:
    out = {}
    for key, value in values.items():
        ok, allowed = _RULES[key]
        is_int = isinstance(value, int) and not isinstance(value, bool)
        number = is_int or (isinstance(value, float) and math.isfinite(value))
        if key == "top_k" and isinstance(value, float) and value.is_integer():
            value, is_int = int(value), True
        if not number or (key == "top_k" and not is_int) or not ok(value):
            raise SourceError(f"{where}: {key} must be {allowed}, got {value!r}; correct or remove it there "
                              f"(it becomes the package's default for {key})", param=key, reason="invalid")
        out[key] = int(value) if key == "top_k" else float(value)
    return out
