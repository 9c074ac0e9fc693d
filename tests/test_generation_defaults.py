"""A source's own sampling defaults (generation_config.json, GGUF general.sampling.*) reach the
manifest at export and Model.defaults at load (exporters/generation_defaults.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporters.generation_defaults import generation_defaults
from portable_infer.errors import SourceError
from portable_infer.package.manifest import GenerationDefaults

GREEDY = GenerationDefaults()


@dataclass
class _Src:
    kind: str
    path: Path
    meta: dict = field(default_factory=dict)


def _hf(tmp_path, gen) -> _Src:
    if gen is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return _Src("hf", tmp_path)


def test_without_generation_config_the_package_stays_greedy(tmp_path):
    assert generation_defaults(_hf(tmp_path, None)) == GREEDY


def test_without_do_sample_transformers_is_greedy_and_so_are_we(tmp_path):
    got = generation_defaults(_hf(tmp_path, {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1,
                                             "eos_token_id": 2}))
    assert got == GenerationDefaults(repetition_penalty=1.1)


def test_do_sample_carries_the_values_and_transformers_defaults(tmp_path):
    got = generation_defaults(_hf(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    assert got == GenerationDefaults(temperature=0.6, top_p=0.9, top_k=50)  # top_k: transformers' 50
    got = generation_defaults(_hf(tmp_path, {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
                                             "repetition_penalty": 1.05}))
    assert got == GenerationDefaults(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


@pytest.mark.parametrize("key,value", [("top_p", 1.5), ("top_p", 0), ("temperature", -1), ("top_k", 2.5),
                                       ("top_k", True), ("temperature", "hot"), ("repetition_penalty", 0)])
def test_a_value_out_of_range_is_a_source_error_naming_it(tmp_path, key, value):
    with pytest.raises(SourceError, match=key) as info:
        generation_defaults(_hf(tmp_path, {"do_sample": True, key: value}))
    assert info.value.param == key and "generation_config.json" in str(info.value)


def test_bad_json_is_a_source_error(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        generation_defaults(_Src("hf", tmp_path))


def test_gguf_sampling_keys(tmp_path):
    meta = {"general.sampling.temp": 0.6000000238418579, "general.sampling.top_k": 40,
            "general.sampling.top_p": 0.949999988079071, "general.sampling.penalty_repeat": 1.100000023841858}
    assert generation_defaults(_Src("gguf", tmp_path / "m.gguf", meta)) == GenerationDefaults(
        temperature=0.6, top_k=40, top_p=0.95, repetition_penalty=1.1)
    no_temp = {k: v for k, v in meta.items() if k != "general.sampling.temp"}
    assert generation_defaults(_Src("gguf", tmp_path / "m.gguf", no_temp)) == GenerationDefaults(
        repetition_penalty=1.1)
    assert generation_defaults(_Src("gguf", tmp_path / "m.gguf", {})) == GREEDY


def test_export_and_load_carry_the_sources_defaults(tiny_llama, tmp_path):
    """End to end: generation_config.json of an HF folder -> manifest.json -> Model.defaults."""
    import portable_infer
    from exporters.export import export

    src = tmp_path / "hf"
    shutil.copytree(tiny_llama.source, src)
    gen = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").exists() else {}
    gen.update(do_sample=True, temperature=0.6, top_p=0.9)
    (src / "generation_config.json").write_text(json.dumps(gen))
    pkg = export(src, tmp_path / "pkg", precision="fp32", variants=("portable",), verify=False)
    written = json.loads((pkg / "manifest.json").read_text())["generation"]
    assert (written["temperature"], written["top_p"], written["top_k"]) == (0.6, 0.9, 50)
    d = portable_infer.load(pkg, "cpu").defaults
    assert (d.temperature, d.top_p, d.top_k) == (0.6, 0.9, 50)
