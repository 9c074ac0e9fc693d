"""A package is a trust boundary: no name in it can make the runtime open a file outside it.

Every path field of the manifest (variant files, tokenizer, tokenizer config, chat template,
files[]), symbolic links out of the package, and the external-data locations inside each ONNX
graph; in a package directory, in a ``.pinf`` bundle (signed too) and at ``pack``; at every
``check`` level. A violation is an :class:`UnsafePathError` (a PackageError) naming the field
and the path, raised before ONNX Runtime or the tokenizer opens anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from portable_infer.package import manifest as mf
from portable_infer.package.bundle import pack
from portable_infer.errors import PackageError, UnsafePathError
from portable_infer.package.onnx_refs import graph_refs

from _trust import copy_package, full_package, make_bundle, manifest_dict, package_files, write_manifest, keys, load_cpu as _load  # noqa: F401

pytest.importorskip("cryptography")

SECRET = "root:x:0:0:the secret\n"
CHECKS = ("sha256", "size", "none")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PORTABLE_INFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every package; nothing may read it or say anything about it."""
    p = tmp_path / "outside" / "secret.txt"
    p.parent.mkdir()
    p.write_text(SECRET * 37)
    return p


def _nothing_unpacked(home: Path) -> bool:
    bundles = home / "bundles"
    return not bundles.exists() or not any(p.name != ".lock" for p in bundles.iterdir())


# --- every path field, every way out ----------------------------------------------------------------
FIELDS = {
    "variants[0].file": lambda d, v: d["variants"][0].update(file=v),
    "tokenizer.file": lambda d, v: d["tokenizer"].update(file=v),
    "tokenizer.config_file": lambda d, v: d["tokenizer"].update(config_file=v),
    "tokenizer.chat_template_file": lambda d, v: d["tokenizer"].update(chat_template_file=v),
    "files[0].path": lambda d, v: d["files"][0].update(path=v),
}
BAD = {
    "dotdot": "../../../../../../{secret}",
    "absolute": "{secret_abs}",
    "drive letter": "C:/Windows/win.ini",
    "drive relative": "C:model.onnx",
    "backslash": "..\\..\\secret.txt",
    "nul": "model.onnx\x00.txt",
    "dot component": "./model.onnx",
    "inner dotdot": "sub/../model.onnx",
    "empty": "",
}


def _bad(name: str, secret: Path) -> str:
    return BAD[name].format(secret=secret.name, secret_abs=secret)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("field", list(FIELDS))
def test_unsafe_name_in_a_package_directory(full_package, tmp_path, secret, field, bad, check):
    pkg = copy_package(full_package, tmp_path / "pkg")
    d = manifest_dict(pkg)
    value = _bad(bad, secret)
    FIELDS[field](d, value)
    write_manifest(pkg, d)
    with pytest.raises(UnsafePathError) as info:
        _load(pkg, check)
    assert info.value.field == field and info.value.path == value
    assert field in str(info.value)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bad", ["dotdot", "absolute", "drive letter", "backslash"])
@pytest.mark.parametrize("field", list(FIELDS))
def test_unsafe_name_in_a_bundle(full_package, tmp_path, home, secret, keys, field, bad, signed):
    d = manifest_dict(full_package)
    files = package_files(full_package, d)
    value = _bad(bad, secret)
    FIELDS[field](d, value)
    bundle = make_bundle(tmp_path / "evil.pinf", d, files, keys / "key.pem" if signed else None)
    with pytest.raises(UnsafePathError) as info:
        _load(bundle, trust=keys / "key.pub.pem" if signed else None)
    assert info.value.field == field and info.value.path == value
    assert _nothing_unpacked(home)


@pytest.mark.parametrize("field", list(FIELDS))
def test_pack_refuses_an_unsafe_name(full_package, tmp_path, secret, field):
    pkg = copy_package(full_package, tmp_path / "pkg")
    d = manifest_dict(pkg)
    FIELDS[field](d, f"../{secret.parent.name}/{secret.name}")
    write_manifest(pkg, d)
    with pytest.raises(UnsafePathError, match=field.replace("[", r"\[").replace("]", r"\]")):
        pack(pkg, tmp_path / "out.pinf")
    assert not (tmp_path / "out.pinf").exists()


def test_chat_template_outside_is_never_read(full_package, tmp_path, secret):
    """The issue's probe: `chat_template_file: ../../../../etc/passwd` became every chat prompt."""
    pkg = copy_package(full_package, tmp_path / "pkg")
    d = manifest_dict(pkg)
    d["tokenizer"]["chat_template_file"] = os.path.relpath(secret, pkg)
    write_manifest(pkg, d)
    for check in CHECKS:
        with pytest.raises(UnsafePathError, match="chat_template_file"):
            _load(pkg, check)


@pytest.mark.parametrize("field", ["tokenizer.chat_template_file", "tokenizer.file", "variants[0].file"])
def test_named_file_must_be_listed(full_package, tmp_path, field):
    """A file inside the package but missing from files[] would be opened without any check."""
    pkg = copy_package(full_package, tmp_path / "pkg")
    (pkg / "unlisted.bin").write_bytes((pkg / "chat_template.jinja").read_bytes())
    d = manifest_dict(pkg)
    FIELDS[field](d, "unlisted.bin")
    write_manifest(pkg, d)
    with pytest.raises(UnsafePathError, match="not listed in files"):
        _load(pkg, "none")


# --- symbolic links --------------------------------------------------------------------------------------
LINKED = ["chat_template.jinja", "tokenizer.json", "model.onnx", "model.onnx.data", "generation_config.json"]


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", LINKED)
def test_symlink_out_of_the_package(full_package, tmp_path, secret, name, check):
    pkg = copy_package(full_package, tmp_path / "pkg")
    (pkg / name).unlink()
    (pkg / name).symlink_to(secret)
    if check == "none" and name == "generation_config.json":  # never opened at "none": nothing to refuse
        _load(pkg, check)
        return
    with pytest.raises(UnsafePathError, match="resolves outside") as info:
        _load(pkg, check)
    assert info.value.path == name
    assert str(secret.stat().st_size) not in str(info.value)  # nothing about the outside file


def test_symlinked_directory_out_of_the_package(full_package, tmp_path, secret):
    pkg = copy_package(full_package, tmp_path / "pkg")
    (pkg / "sub").symlink_to(secret.parent, target_is_directory=True)
    d = manifest_dict(pkg)
    d["tokenizer"]["chat_template_file"] = f"sub/{secret.name}"
    d["files"].append({"path": f"sub/{secret.name}", "sha256": "0" * 64, "size": 1})
    write_manifest(pkg, d)
    with pytest.raises(UnsafePathError, match="resolves outside"):
        _load(pkg, "none")


def test_symlink_inside_the_package_is_fine(full_package, tmp_path):
    pkg = copy_package(full_package, tmp_path / "pkg")
    (pkg / "real").mkdir()
    os.replace(pkg / "chat_template.jinja", pkg / "real" / "t.jinja")
    (pkg / "chat_template.jinja").symlink_to(Path("real") / "t.jinja")
    assert _load(pkg).chat_template is not None


def test_manifest_symlinked_out_is_refused(full_package, tmp_path, secret):
    pkg = copy_package(full_package, tmp_path / "pkg")
    outside = secret.parent / "manifest.json"
    os.replace(pkg / "manifest.json", outside)
    (pkg / "manifest.json").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="manifest.json"):
        _load(pkg)


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_files_entry_outside_discloses_nothing(full_package, tmp_path, secret, how):
    """`files[]: ../../etc/shadow` with a wrong size used to report the file's real size."""
    pkg = copy_package(full_package, tmp_path / "pkg")
    d = manifest_dict(pkg)
    if how == "dotdot":
        name = os.path.relpath(secret, pkg)
    else:
        name = "shadow"
        (pkg / name).symlink_to(secret)
    d["files"].append({"path": name, "sha256": "0" * 64, "size": 1})
    write_manifest(pkg, d)
    for check in ("sha256", "size"):
        with pytest.raises(UnsafePathError) as info:
            _load(pkg, check)
        message = str(info.value)
        assert str(secret.stat().st_size) not in message and "bytes" not in message
        assert info.value.field.startswith("files[")


def test_reserved_names_cannot_be_listed(full_package, tmp_path):
    pkg = copy_package(full_package, tmp_path / "pkg")
    d = manifest_dict(pkg)
    d["files"].append({"path": "manifest.json", "sha256": "0" * 64, "size": 1})
    write_manifest(pkg, d)
    with pytest.raises(UnsafePathError, match="reserved"):
        _load(pkg)


# --- external data named inside the graphs ----------------------------------------------------------------
def _relocate(pkg: Path, graph: str, location: str) -> None:
    """Point every external tensor of ``graph`` at ``location``; files[] updated for the graph."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(pkg / graph), load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(model):
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(pkg / graph))
    d = manifest_dict(pkg)
    for f in d["files"]:
        if f["path"] == graph:
            f.update(sha256=mf.sha256_file(pkg / graph), size=(pkg / graph).stat().st_size)
    write_manifest(pkg, d)


@pytest.fixture
def outside_data(full_package, tmp_path) -> Path:
    """A valid copy of the portable graph's weights, outside the package."""
    p = tmp_path / "outside" / "weights.bin"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes((full_package / "model.onnx.data").read_bytes())
    return p


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("where", ["dotdot", "absolute", "unlisted", "symlink"])
def test_external_data_outside_or_unlisted(full_package, tmp_path, outside_data, where, check):
    pkg = copy_package(full_package, tmp_path / "pkg")
    location = {"dotdot": f"../outside/{outside_data.name}", "absolute": str(outside_data),
                "unlisted": "extra.bin", "symlink": "link.bin"}[where]
    if where == "unlisted":  # inside the package, a valid copy of the weights, but never hashed
        (pkg / "extra.bin").write_bytes(outside_data.read_bytes())
    if where == "symlink":
        (pkg / "link.bin").symlink_to(outside_data)
        d = manifest_dict(pkg)
        d["files"].append({"path": "link.bin", "sha256": mf.sha256_file(outside_data),
                           "size": outside_data.stat().st_size})
        write_manifest(pkg, d)
    _relocate(pkg, "model.onnx", location)
    with pytest.raises(UnsafePathError, match="external data|resolves outside") as info:
        _load(pkg, check, static_kv=False)
    assert info.value.path in (location, "link.bin")


@pytest.mark.parametrize("signed", [False, True])
def test_external_data_outside_in_a_bundle(full_package, tmp_path, home, outside_data, keys, signed):
    pkg = copy_package(full_package, tmp_path / "pkg")
    _relocate(pkg, "model.onnx", str(outside_data))
    d = manifest_dict(pkg)
    bundle = make_bundle(tmp_path / "evil.pinf", d, package_files(pkg, d), keys / "key.pem" if signed else None)
    with pytest.raises(UnsafePathError, match="external data"):
        _load(bundle, trust=keys / "key.pub.pem" if signed else None, static_kv=False)
    assert _nothing_unpacked(home)  # refused before the unpacked copy was published
    with pytest.raises(UnsafePathError, match="external data"):
        pack(pkg, tmp_path / "again.pinf")


def test_graph_that_is_not_onnx_is_refused(full_package, tmp_path):
    pkg = copy_package(full_package, tmp_path / "pkg")
    (pkg / "model.onnx").write_bytes(b"\xff" * 64)
    d = manifest_dict(pkg)
    write_manifest(pkg, d, refresh=True)
    with pytest.raises(PackageError, match="not a readable ONNX graph"):
        _load(pkg, "none")


# --- the scanner itself ------------------------------------------------------------------------------------
def _onnx_locations(path: Path) -> set:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in onnx.external_data_helper._get_all_tensors(model) for e in t.external_data
            if e.key == "location"}


def test_scanner_agrees_with_onnx_on_exported_graphs(full_package):
    for v in mf.Manifest.load(full_package).variants:
        with open(full_package / v.file, "rb") as f:
            assert graph_refs(f, v.file) == _onnx_locations(full_package / v.file) != set()


def test_scanner_finds_tensors_in_subgraphs_sparse_and_functions(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def ext(name, loc):
        t = numpy_helper.from_array(np.zeros(2, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", loc), ("offset", "0"), ("length", "8")):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=ext("c", "in_subgraph.bin"))],
                               "b", [], [out])
    sparse = helper.make_sparse_tensor(ext("sv", "sparse_values.bin"), ext("si", "sparse_idx.bin"), [4])
    node_if = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    fn = helper.make_function("local", "f", ["a"], ["b"], [
        helper.make_node("Constant", [], ["b"], value=ext("fc", "in_function.bin"))],
        [helper.make_opsetid("", 17)])
    g = helper.make_graph([node_if], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [out],
                          [ext("w", "initializer.bin")], sparse_initializer=[sparse])
    model = helper.make_model(g, functions=[fn], opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    expected = {"in_subgraph.bin", "sparse_values.bin", "sparse_idx.bin", "in_function.bin", "initializer.bin"}
    with open(tmp_path / "m.onnx", "rb") as f:
        assert graph_refs(f, "m.onnx") == expected
    assert _onnx_locations(tmp_path / "m.onnx") <= expected  # onnx's own walk skips functions


def test_scanner_field_numbers_match_onnx():
    onnx = pytest.importorskip("onnx")
    from portable_infer.package import onnx_refs as r

    protos = {r.MODEL: onnx.ModelProto, r.GRAPH: onnx.GraphProto, r.NODE: onnx.NodeProto,
              r.ATTR: onnx.AttributeProto, r.TENSOR: onnx.TensorProto, r.SPARSE: onnx.SparseTensorProto,
              r.FUNCTION: onnx.FunctionProto, r.TRAINING: onnx.TrainingInfoProto}
    names = {onnx.GraphProto: r.GRAPH, onnx.NodeProto: r.NODE, onnx.AttributeProto: r.ATTR,
             onnx.TensorProto: r.TENSOR, onnx.SparseTensorProto: r.SPARSE, onnx.FunctionProto: r.FUNCTION,
             onnx.TrainingInfoProto: r.TRAINING}
    for kind, proto in protos.items():
        want = {}
        for f in proto.DESCRIPTOR.fields:
            sub = f.message_type
            for cls, k in names.items():
                if sub is not None and sub.full_name == cls.DESCRIPTOR.full_name:
                    want[f.number] = k
            if kind == r.TENSOR and f.name == "external_data":
                want[f.number] = r.ENTRY
        assert r.SCHEMA[kind] == want, proto.__name__
    assert onnx.NodeProto.DESCRIPTOR.fields_by_name["op_type"].number == r.NODE_OP_TYPE


def test_ep_context_node_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", ep_cache_context="../../cache.bin",
                            embed_mode=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(tmp_path / "m.onnx"))
    with open(tmp_path / "m.onnx", "rb") as f, pytest.raises(PackageError, match="EPContext"):
        graph_refs(f, "m.onnx")


@pytest.mark.parametrize("blob", [b"\x0a\xff\xff\xff\xff\x0f", b"\x0b\x00", b"\x3a\x05ab", b"\x80"])
def test_scanner_refuses_malformed_protobuf(tmp_path, blob):
    p = tmp_path / "m.onnx"
    p.write_bytes(blob)
    with open(p, "rb") as f, pytest.raises(PackageError, match="not a readable ONNX graph"):
        graph_refs(f, "m.onnx")


def test_ort_named_file_must_be_ort_format(tmp_path, full_package):
    p = tmp_path / "m.ort"
    p.write_bytes((full_package / "model.onnx").read_bytes())
    with open(p, "rb") as f, pytest.raises(PackageError, match="not an ORT-format graph"):
        graph_refs(f, "m.ort")
