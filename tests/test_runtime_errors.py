"""Every bad input gives a typed PortableInferError whose message says what to do.

Broken packages are copies of the tiny llama package (tests/conftest.py) damaged one way each;
the CLI turns the same errors into ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")  # the tiny package is exported from a transformers model

import portable_infer  # noqa: E402
from portable_infer import cli  # noqa: E402
from portable_infer.errors import (  # noqa: E402
    ChecksumError, ContextLengthError, InvalidArgumentError, PackageError, PortableInferError, ProviderError,
    SchemaVersionError,
)
from portable_infer.engine.providers import ENV_VAR  # noqa: E402

PROMPT = [5, 17, 42, 99]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return portable_infer.load(tiny_llama.package, "cpu", intra_op_threads=2)


@pytest.fixture
def package(tiny_llama, tmp_path):
    """A private copy of the tiny package, to damage."""
    return shutil.copytree(tiny_llama.package, tmp_path / "pkg")


def test_errors_share_the_base_class():
    for cls in (ChecksumError, SchemaVersionError, ContextLengthError, InvalidArgumentError, ProviderError):
        assert issubclass(cls, PortableInferError)


# --- packages -----------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(PackageError, match="does not exist") as err:
        portable_infer.load(tmp_path / "nope")
    assert "portable-infer export" in str(err.value)


def test_directory_without_manifest(tmp_path):
    with pytest.raises(PackageError, match="manifest.json not found") as err:
        portable_infer.load(tmp_path)
    assert "not a model package" in str(err.value) and "portable-infer export" in str(err.value)


def test_manifest_not_json(package):
    (package / "manifest.json").write_text('{"schema_version": 1, "model": ', encoding="utf-8")
    with pytest.raises(PackageError, match="not valid JSON") as err:
        portable_infer.load(package)
    assert "re-export" in str(err.value)


def test_manifest_not_an_object(package):
    (package / "manifest.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(PackageError, match="JSON object"):
        portable_infer.load(package)


def test_manifest_missing_a_field(package):
    data = json.loads((package / "manifest.json").read_text())
    del data["model"]
    (package / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="malformed.*re-export"):
        portable_infer.load(package)


@pytest.mark.parametrize("version", [999, 0, None, "1"])
def test_unknown_schema_version(package, version):
    data = json.loads((package / "manifest.json").read_text())
    data["schema_version"] = version
    (package / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SchemaVersionError, match=f"schema_version is {version!r}") as err:
        portable_infer.load(package)
    assert "re-export" in str(err.value)


def test_flipped_byte_in_weights(package):
    data = package / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="sha256") as err:
        portable_infer.load(package)
    assert "model.onnx.data" in str(err.value) and "re-copy or re-export" in str(err.value)
    portable_infer.load(package, "cpu", check="size")  # the sizes still match: that check passes


def test_truncated_weights(package):
    data = package / "model.onnx.data"
    raw = data.read_bytes()
    data.write_bytes(raw[:-100])
    with pytest.raises(ChecksumError, match="truncated") as err:
        portable_infer.load(package, check="size")
    assert f"{len(raw) - 100} bytes, the manifest says {len(raw)}" in str(err.value)


def test_missing_listed_file(package):
    (package / "model.onnx.data").unlink()
    with pytest.raises(PackageError, match="missing from the package") as err:
        portable_infer.load(package)
    assert "re-export or re-copy" in str(err.value)


def test_unknown_check_mode(tiny_llama):
    with pytest.raises(InvalidArgumentError, match="check must be one of"):
        portable_infer.load(tiny_llama.package, check="md5")


@pytest.mark.parametrize("level", [0, 2, 3, "4"])
def test_unknown_accuracy_level(tiny_llama, level):
    with pytest.raises(InvalidArgumentError, match=r"accuracy_level must be one of \(None, 1, 4\)"):
        portable_infer.load(tiny_llama.package, accuracy_level=level)


# --- sampling and prompts -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name, says", [
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"temperature": float("nan")}, "temperature", ">= 0"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_k": -2}, "top_k", ">= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens", ">= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens", "int"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"stop": "###"}, "stop", "list"),
    ({"temprature": 0.5}, "temprature", "valid ones are"),
])
def test_bad_sampling_values(model, kwargs, name, says):
    calls = (model.generate_ids, lambda p, **kw: model.batch_generate_ids([p, p], **kw),
             lambda p, **kw: list(model.stream_generate(p, **kw)))
    for call in calls:
        with pytest.raises(InvalidArgumentError) as err:
            call(PROMPT, **kwargs)
        assert name in str(err.value) and says in str(err.value), str(err.value)


def test_prompt_over_the_context(tiny_llama):
    model = portable_infer.load(tiny_llama.short_package, "cpu")
    assert model.max_context == 16
    with pytest.raises(ContextLengthError, match="context is 16") as err:
        model.generate_ids(list(range(3, 23)))
    assert "truncate=True" in str(err.value)
    assert len(model.generate_ids(list(range(3, 23)), truncate=True, max_new_tokens=4, ignore_eos=True)) == 1


@pytest.mark.parametrize("ids", [[5, 256], [-1, 5], [5, 1000], [3.0, 4], ["a"]])
def test_token_ids_out_of_range(model, ids):
    with pytest.raises(InvalidArgumentError, match=r"token ids must be ints in \[0, 256\)"):
        model.generate_ids(ids)


def test_empty_prompt(model):
    with pytest.raises(InvalidArgumentError, match="empty"):
        model.generate_ids([])


def test_text_prompt_without_tokenizer(model):
    with pytest.raises(PackageError, match="no tokenizer.json") as err:
        model.generate("Hello")
    assert "generate_ids" in str(err.value)
    with pytest.raises(PackageError, match="no chat template"):
        model.chat([{"role": "user", "content": "Hi"}])


def test_text_layer_without_tokenizer_is_an_error_not_empty_text(model):
    with pytest.raises(PackageError, match="no tokenizer.json"):
        model.generate(PROMPT, max_new_tokens=3)
    with pytest.raises(PackageError, match="no tokenizer.json"):
        model.batch_generate([PROMPT], max_new_tokens=3)
    with pytest.raises(PackageError, match="no tokenizer.json"):  # stop strings are matched on text
        list(model.stream_generate(PROMPT, max_new_tokens=3, stop=["x"]))


def test_stop_strings_are_not_ignored_by_generate_ids(model):
    with pytest.raises(InvalidArgumentError, match="stop_token_ids"):
        model.generate_ids(PROMPT, stop=["x"])
    with pytest.raises(InvalidArgumentError, match="stop_token_ids"):
        model.batch_generate_ids([PROMPT], stop=["x"])


# --- providers ----------------------------------------------------------------------------------
def test_unknown_provider_lists_the_known_ones(tiny_llama):
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu'") as err:
        portable_infer.load(tiny_llama.package, "tpu")
    for name in ("cpu", "cuda", "openvino"):
        assert name in str(err.value)


def test_strict_cuda_on_a_cpu_build(tiny_llama):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(ProviderError, match="cuda") as err:
        portable_infer.load(tiny_llama.package, "cuda", strict=True)
    assert "pip install" in str(err.value)


def test_non_strict_cuda_falls_back_to_cpu(tiny_llama):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    assert portable_infer.load(tiny_llama.package, "cuda").provider == "CPUExecutionProvider"


def test_environment_variable_picks_the_provider(tiny_llama, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    model = portable_infer.load(tiny_llama.package)
    assert model.provider == "CPUExecutionProvider"
    assert len(model.generate_ids(PROMPT, max_new_tokens=3, ignore_eos=True)) == 3


def test_bad_environment_variable_names_it(tiny_llama, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(ProviderError, match=ENV_VAR):
        portable_infer.load(tiny_llama.package)


# --- the CLI ------------------------------------------------------------------------------------
def test_cli_missing_package(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "Hello"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def test_cli_inspect(tiny_llama, capsys):
    assert cli.main(["inspect", str(tiny_llama.package)]) == 0
    out = capsys.readouterr().out
    assert "model        llama (family llama), 2 layers, hidden 64" in out
    assert "4 heads, 2 kv heads, head_dim 16" in out
    assert "vocab        256, max context 256" in out
    assert "precision    fp32" in out
    assert "variant      portable: model.onnx" in out


def test_cli_inspect_not_a_package(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "not a model package" in capsys.readouterr().err


def test_cli_generate_without_tokenizer(tiny_llama, capsys):
    assert cli.main(["generate", "--model", str(tiny_llama.package), "--provider", "cpu", "Hello"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "no tokenizer.json" in err and "Traceback" not in err


def test_cli_unknown_provider(tiny_llama, capsys):
    assert cli.main(["generate", "--model", str(tiny_llama.package), "--provider", "tpu", "Hello"]) == 2
    assert "known names" in capsys.readouterr().err
