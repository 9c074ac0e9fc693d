"""Export says which int8-activation graphs load() will not choose by default: a warning for a float
source (its rounding was chosen at export: ``--symmetric``, ``--block``), only a log record for a
pre-quantized one (its exact graphs are its reference, and an int8 graph below the gate is usual)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

import exporters.lean_verify as lean_verify
from exporters import export as export_mod
from exporters.export import export
from exporters.sources import quantized_as
from portable_infer.package.verification import Quality, VariantReport

LOGGER = "exporters.export"


def _verification(agreed_int8: int):
    """A stand-in for export verification: every graph at the reference, static-int8 agreeing on
    ``agreed_int8`` of 100 positions at the same perplexity (the floor is 90, the gate 98)."""
    def fake(package, manifest, src):
        full = {v.name: VariantReport(quality=Quality(100, 100, perplexity=10.0, perplexity_reference=10.0))
                for v in manifest.variants}
        full["static-int8"] = VariantReport(quality=Quality(agreed_int8, 100, perplexity=10.0, perplexity_reference=10.0))
        return full
    return fake


@pytest.mark.parametrize("agreed, quantized, level", [(95, None, logging.WARNING), (95, "gguf", logging.INFO),
                                                      (99, None, None)])
def test_export_names_the_int8_graph_below_the_gate(tiny_llama, tmp_path, caplog, monkeypatch, agreed, quantized, level):
    monkeypatch.setattr(lean_verify, "verify_export", _verification(agreed))
    monkeypatch.setattr(export_mod, "quantized_as", lambda src: quantized)
    caplog.set_level(logging.INFO, logger=LOGGER)
    pkg = export(tiny_llama.source, tmp_path / "pkg", precision="int4", variants=("static", "static-int8"))
    assert (pkg / "model.static-int8.onnx").is_file()  # above the floor: kept either way
    notes = [r for r in caplog.records if r.name == LOGGER and "below the quality gate" in r.getMessage()]
    if level is None:
        assert notes == []
    else:
        assert [r.levelno for r in notes] == [level]
        assert "static-int8" in notes[0].getMessage() and "load() runs static" in notes[0].getMessage()
        assert "accuracy_level=4" in notes[0].getMessage()


def test_quantized_as():
    assert quantized_as(SimpleNamespace(kind="gguf")) == "gguf"
    assert quantized_as(SimpleNamespace(kind="hf", quantization=None)) is None
    assert quantized_as(SimpleNamespace(kind="hf", quantization=SimpleNamespace(method="awq"))) == "awq"
