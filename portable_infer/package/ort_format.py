"""ONNX Runtime (ORT) format graphs for ``pack --ort``: smaller runtimes, faster session start.

ONNX Runtime's own converter (``python -m onnxruntime.tools.convert_onnx_models_to_ort``, shipped
in the onnxruntime wheel; it imports ``onnx``) optimizes each graph for the CPU provider and saves
it as a flatbuffer ``.ort`` file, plus ``required_operators.config``: the operator list a minimal
ONNX Runtime build (``--minimal_build --include_ops_by_config``) needs. A minimal build reads only
``.ort`` files.

The converter writes the weights *inside* the ``.ort`` file (ONNX external data is inlined), and
a flatbuffer is limited to 2 GiB, so only graphs whose weights stay under that are converted.

Each converted graph becomes one more manifest variant, ``<source name>-ort`` (e.g.
``fused-ort``, file ``model.fused.ort``), with the inputs, outputs and KV layout of its source.
The CPU provider prefers ``*-ort`` variants when a package has them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from portable_infer.errors import DependencyError, ExportError, InvalidArgumentError
from portable_infer.package.manifest import FileEntry, Manifest, sha256_file
from portable_infer.package.variants import ORT_SUFFIX

logger = logging.getLogger(__name__)

OPS_CONFIG = "required_operators.config"
FLATBUFFER_LIMIT = 2 << 30  # bytes: the flatbuffer format's 2 GiB ceiling
CONVERTER = "onnxruntime.tools.convert_onnx_models_to_ort"


def ort_file(onnx_file: str) -> str:
    """``model.fused.onnx`` -> ``model.fused.ort`` (the converter's naming)."""
    return (onnx_file[:-5] if onnx_file.endswith(".onnx") else onnx_file) + ".ort"


def _external_data(graph: Path) -> list:
    """The external-data locations ``graph`` names (relative to its directory), read from the graph
    itself (``onnx_refs``); ``pack`` has confined and listed them (``package_paths``) before this."""
    from portable_infer.package.onnx_refs import graph_refs

    with open(graph, "rb") as f:
        return sorted(graph_refs(f, graph.name))


def _graph_bytes(package: Path, file: str) -> int:
    """The graph file plus the external data files it references."""
    graph = package / file
    return graph.stat().st_size + sum((graph.parent / loc).stat().st_size for loc in _external_data(graph))


def default_sources(manifest: Manifest) -> list:
    """The variant the CPU provider would run (fused when present): the one worth converting."""
    from portable_infer.engine.providers import CPU
    from portable_infer.engine.variant_choice import pick_variant

    v = pick_variant(CPU, [v for v in manifest.variants if not v.name.endswith(ORT_SUFFIX)])
    return [v.name] if v is not None else []


def convert(onnx_paths: list, out_dir: Path) -> None:
    """Run ONNX Runtime's converter on ``onnx_paths`` (graphs with the external data they name).

    Writes ``out_dir/<name>.ort`` for each and one ``out_dir/required_operators.config``.
    """
    if importlib.util.find_spec("onnx") is None:  # the converter imports it
        raise DependencyError('pack --ort runs ONNX Runtime\'s converter, which needs onnx: pip install onnx '
                              '(or pip install "portable-infer[export]")')
    src = out_dir / "src"
    src.mkdir(parents=True)
    for p in onnx_paths:  # one folder of graphs -> one operator config for all of them
        _link(p, src / p.name)
        for loc in _external_data(p):
            if not (src / loc).exists():  # graphs may share one data file (static and fused do)
                (src / loc).parent.mkdir(parents=True, exist_ok=True)
                _link(p.parent / loc, src / loc)
    cmd = [sys.executable, "-m", CONVERTER, str(src), "--output_dir", str(out_dir), "--optimization_style", "Fixed"]
    env = {**os.environ, "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": "all"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise ExportError(f"ONNX Runtime's ORT-format converter failed ({' '.join(cmd[2:4])}):\n"
                          f"{(r.stdout + r.stderr)[-2000:]}")
    logger.debug("converter output:\n%s", r.stdout)
    config = out_dir / OPS_CONFIG
    if config.is_file():  # its comments name our scratch folder; keep names relative to the bundle
        text = config.read_text(encoding="utf-8").replace(f"{out_dir.resolve()}{os.sep}", "")
        config.write_text(text, encoding="utf-8")


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks here (Windows without the privilege): copy
        import shutil

        shutil.copyfile(src, dst)


def add_ort_variants(manifest: Manifest, package: Path, work: Path, which=True) -> tuple:
    """Convert variants of ``package`` to ORT format in ``work``.

    Args:
        manifest: the package's manifest.
        package: the package directory.
        work: an empty scratch directory (the .ort files are left there).
        which: True (the variant the CPU provider runs) or a list of variant names.

    Returns:
        (new manifest with the ``*-ort`` variants and their files, {file path: source path}).
    """
    names = default_sources(manifest) if which is True else list(which)
    if not names:
        raise InvalidArgumentError("pack --ort: the package has no graph variant the CPU provider can run")
    have = {v.name for v in manifest.variants}
    sources = [manifest.variant(n) for n in names]  # raises on an unknown name
    for v in sources:
        if v.name + ORT_SUFFIX in have:
            raise InvalidArgumentError(f"the package already has an ORT-format variant {v.name + ORT_SUFFIX!r}")
        size = _graph_bytes(package, v.file)
        if size >= FLATBUFFER_LIMIT:
            raise ExportError(f"variant {v.name!r} holds {size / 2**30:.2f} GiB of weights; the ORT format stores "
                              f"weights inside one flatbuffer, limited to 2 GiB: pack it without --ort")
    work.mkdir(parents=True, exist_ok=True)
    convert([package / v.file for v in sources], work)
    files = {ort_file(v.file): work / ort_file(v.file) for v in sources}
    files[OPS_CONFIG] = work / OPS_CONFIG
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ExportError(f"ONNX Runtime's converter did not write {missing}")
    variants = [dataclasses.replace(v, name=v.name + ORT_SUFFIX, file=ort_file(v.file), providers=("cpu",))
                for v in sources]
    entries = [FileEntry(path, sha256_file(p), p.stat().st_size) for path, p in files.items()]
    new = dataclasses.replace(manifest, variants=tuple(manifest.variants) + tuple(variants),
                              files=tuple(sorted((*manifest.files, *entries), key=lambda e: e.path)))
    return new, files
