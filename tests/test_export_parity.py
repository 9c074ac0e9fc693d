"""Parity of exported packages against transformers, on tiny random models of every family.

Each case builds a tiny random-weight transformers model (hidden 64, head_dim 16), saves it,
exports it at fp32 without the exporter's own verification, and checks the graph with raw
ONNX Runtime calls:

* full-sequence logits vs ``model(input_ids, attention_mask, position_ids)``;
* prefill + one-token decode through ``present -> past`` == full recompute;
* a left-padded batch of 2 == each sequence alone (logits and 8 greedy steps);
* 16 greedy tokens identical to transformers;
* the fused variant (last-position logits) through prefill + decode == portable == transformers;
* one ``export(..., verify=True)`` per family passes the exporter's own gate.

Precision (fp16, int8, int4) is checked on one llama with a fixed seed (see ``precisions``).

A greedy divergence is excused only where the reference's top two logits tie within REL_TOL.
Every parameter is randomized (norm weights and biases too: transformers initializes them to
1 and 0, which would hide a dropped bias or norm weight). The seed is fresh each run and
appears in every assertion message; rerun one with ``PARITY_SEED=<seed> pytest ...``.
Run with ``-s`` to see the table of measured logit differences per case.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from exporters.architectures import FAMILIES, MODEL_TYPES  # noqa: E402
from exporters.export import export  # noqa: E402
from exporters.verify import OnnxDecoder, decoder  # noqa: E402
from portable_infer.package.variants import FP32_REL_TOL  # noqa: E402
import _parity  # noqa: E402
from _parity import int4_variants_track  # noqa: E402
from portable_infer.package.manifest import Manifest  # noqa: E402

SEED = int(os.environ.get("PARITY_SEED") or random.SystemRandom().randrange(2**31))
REL_TOL = 1e-4  # max |onnx - reference| / max |reference|, the exporter's fp32 gate
GREEDY_STEPS = 16
PAD_GREEDY_STEPS = 8
SEQ = 12  # longer than every sliding window below (4)

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
             num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    config_class: str
    kwargs: dict
    tied: bool
    expect_tensors: tuple = ()  # checkpoint tensors proving the case exercises its feature
    window: int | None = None  # sliding window the case must exercise

    def config(self):
        cls = getattr(transformers, self.config_class)
        base = {} if self.family == "gpt2" else SMALL
        return cls(**{**base, **self.kwargs, "tie_word_embeddings": self.tied})


L0 = "model.layers.0."
CASES = (
    Case("llama-gqa-untied", "llama", "LlamaConfig", dict(num_key_value_heads=2), tied=False),
    Case("llama-mqa-tied", "llama", "LlamaConfig", dict(num_key_value_heads=1, num_hidden_layers=3), tied=True),
    Case("llama-rope-llama3", "llama", "LlamaConfig", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
         tied=False),
    Case("llama-mha-bias", "llama", "LlamaConfig", dict(attention_bias=True, mlp_bias=True), tied=False,
         expect_tensors=(L0 + "self_attn.o_proj.bias", L0 + "mlp.down_proj.bias")),
    Case("mistral-sliding4", "mistral", "MistralConfig", dict(num_key_value_heads=2, sliding_window=4),
         tied=False, window=4),
    Case("qwen2-qkv-bias", "qwen2", "Qwen2Config", dict(num_key_value_heads=2), tied=False,
         expect_tensors=tuple(L0 + f"self_attn.{p}_proj.bias" for p in "qkv")),
    Case("qwen2-sliding-layer", "qwen2", "Qwen2Config",
         dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1),
         tied=True, window=4),
    Case("qwen3-qk-norm", "qwen3", "Qwen3Config", dict(num_key_value_heads=2), tied=False,
         expect_tensors=(L0 + "self_attn.q_norm.weight", L0 + "self_attn.k_norm.weight")),
    Case("phi3-fused", "phi3", "Phi3Config", dict(num_key_value_heads=2), tied=False,
         expect_tensors=(L0 + "self_attn.qkv_proj.weight", L0 + "mlp.gate_up_proj.weight")),
    Case("phi3-partial-rotary", "phi3", "Phi3Config", dict(partial_rotary_factor=0.5), tied=False,
         expect_tensors=(L0 + "self_attn.qkv_proj.weight",)),
    Case("gemma3-sliding-global", "gemma3", "Gemma3TextConfig",
         dict(num_key_value_heads=2, num_hidden_layers=3, sliding_window=4,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
         tied=True, expect_tensors=(L0 + "post_feedforward_layernorm.weight",), window=4),
    Case("gpt2-tied", "gpt2", "GPT2Config",
         dict(vocab_size=256, n_embd=64, n_head=4, n_layer=2, n_positions=256, bos_token_id=1, eos_token_id=2),
         tied=True, expect_tensors=("transformer.h.0.attn.c_attn.bias",)),
)

# case id -> {"max_abs", "max_rel", "scale"} of the full-sequence logits; printed at module end
MEASURED: dict[str, dict] = {}


def case_seed(case: Case) -> int:
    return SEED + CASES.index(case)


def randomize(model, seed: int) -> None:
    """Random values for every parameter, 1-D ones (norms, biases) included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.add_(0.2 * noise)  # norms keep their 1 (or Gemma's 0 for 1 + w) as the centre
            else:
                p.copy_(0.08 * noise)


def reference_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    mask = np.ones_like(ids) if mask is None else mask
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos), use_cache=False)
    return out.logits.float().numpy()


def rel_diff(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs difference, the same relative to the reference's logit scale)."""
    d = float(np.abs(a - ref).max())
    return d, d / max(float(np.abs(ref).max()), 1e-12)


def first_divergence(ours: list, ref: list, ref_logits: list, what: str) -> int:
    """Steps agreed; a divergence fails unless the reference itself was a near-tie there, and then
    only after half of the steps agreed (tests/_parity.py)."""
    return _parity.first_divergence(ours, ref, ref_logits, what, tol=REL_TOL)


@dataclass
class Exported:
    case: Case
    seed: int
    model: object
    source: Path
    package: Path
    manifest: Manifest
    vocab: int = field(init=False)
    _decoders: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vocab = self.manifest.model.vocab_size

    def decoder(self, variant: str = "portable") -> OnnxDecoder:
        if variant not in self._decoders:
            v = self.manifest.variant(variant)
            self._decoders[variant] = decoder(self.package / v.file, v, self.manifest)
        return self._decoders[variant]

    @property
    def dec(self) -> OnnxDecoder:
        """The portable graph: logits for every position."""
        return self.decoder("portable")

    def ids(self, rng, shape) -> np.ndarray:
        return rng.integers(1, self.vocab, shape, dtype=np.int64)  # never 0 (the pad id)

    def tag(self) -> str:
        return f"[{self.case.id}, PARITY_SEED={SEED}, case seed {self.seed}]"


def build_source(case: Case, folder: Path):
    seed = case_seed(case)
    torch.manual_seed(seed)
    config = case.config()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def exported(request, tmp_path_factory) -> Exported:
    case = request.param
    root = tmp_path_factory.mktemp(case.id)
    model = build_source(case, root / "hf")
    pkg = export(root / "hf", root / "pkg", precision="fp32", verify=False)
    return Exported(case, case_seed(case), model, root / "hf", pkg, Manifest.load(pkg))


@pytest.fixture(scope="module", autouse=True)
def measured_table():
    yield
    if not MEASURED:
        return
    lines = [f"\nfp32 full-sequence logits, onnx vs transformers (PARITY_SEED={SEED})",
             f"{'case':24} {'family':8} {'max |diff|':>11} {'logit scale':>12} {'relative':>10}"]
    for cid, m in MEASURED.items():
        lines.append(f"{cid:24} {m['family']:8} {m['max_abs']:11.3e} {m['scale']:12.3f} {m['max_rel']:10.3e}")
    print("\n".join(lines))


# --- the guard -------------------------------------------------------------------------------------
def test_every_registered_family_has_a_parity_case():
    covered = {c.family for c in CASES}
    assert set(FAMILIES) == covered, (
        f"families without a parity case: {sorted(set(FAMILIES) - covered)}; add a Case to CASES "
        f"(unknown families here: {sorted(covered - set(FAMILIES))})")


def test_cases_cover_the_features_they_claim():
    by_family = {(c.family, c.tied) for c in CASES}
    assert {("llama", True), ("llama", False), ("gpt2", True), ("gemma3", True)} <= by_family
    for c in CASES:
        cfg = c.config()
        assert MODEL_TYPES[cfg.model_type] == c.family, c.id
    heads = SMALL["num_attention_heads"]
    llama_kv = {c.kwargs.get("num_key_value_heads", heads) for c in CASES if c.family == "llama"}
    assert 1 in llama_kv and any(1 < k < heads for k in llama_kv), "llama needs an MQA and a GQA case"


# --- per case ---------------------------------------------------------------------------------------
def test_checkpoint_and_manifest_describe_the_case(exported: Exported):
    case, m = exported.case, exported.manifest.model
    names = set(_safetensors_keys(exported.source))
    missing = [n for n in case.expect_tensors if n not in names]
    assert not missing, f"{exported.tag()} checkpoint lacks {missing}: the case does not test its feature"
    assert m.architecture == case.family and m.tie_word_embeddings == case.tied, exported.tag()
    # a tied package has no lm_head of its own; an untied one must not reuse the embedding
    graph = onnx.load(str(exported.package / exported.manifest.variant("portable").file), load_external_data=False)
    has_head = any(i.name.startswith("lm_head") for i in graph.graph.initializer)
    assert has_head == (not case.tied), f"{exported.tag()} lm_head initializer present: {has_head}"
    if case.window:
        assert m.sliding_window == case.window and "sliding_attention" in m.layer_types, exported.tag()


def test_full_sequence_logits_match_transformers(exported: Exported):
    rng = np.random.default_rng(exported.seed)
    ids = exported.ids(rng, (2, SEQ))
    mask = np.ones_like(ids)
    ref = reference_logits(exported.model, ids, mask)
    ours, _ = exported.dec.run(ids, mask, exported.dec.empty_past(2))
    assert ours.shape == ref.shape == (2, SEQ, exported.vocab)
    max_abs, max_rel = rel_diff(ours, ref)
    MEASURED[exported.case.id] = {"family": exported.case.family, "max_abs": max_abs, "max_rel": max_rel,
                                  "scale": float(np.abs(ref).max())}
    assert max_rel <= REL_TOL, f"{exported.tag()} logits differ: max abs {max_abs:.3e}, relative {max_rel:.3e}"


def test_cached_decode_equals_full_recompute(exported: Exported):
    dec, d = exported.dec, exported.manifest.model
    rng = np.random.default_rng(exported.seed + 1)
    ids = exported.ids(rng, (2, SEQ))
    mask = np.ones_like(ids)
    full, _ = dec.run(ids, mask, dec.empty_past(2))
    ref = reference_logits(exported.model, ids, mask)

    prefill = 3  # decode most of the sequence, across every sliding window
    logits, past = dec.run(ids[:, :prefill], mask[:, :prefill], dec.empty_past(2))
    steps = [logits]
    for t in range(prefill, SEQ):
        logits, past = dec.run(ids[:, t:t + 1], mask[:, :t + 1], past)
        steps.append(logits)
        for k, v in past:  # present.*: [batch, kv_heads, total, head_dim], kv_heads not heads
            assert k.shape == v.shape == (2, d.num_kv_heads, t + 1, d.head_dim), exported.tag()
    cached = np.concatenate(steps, axis=1)
    _, rel_full = rel_diff(cached, full)
    _, rel_ref = rel_diff(cached, ref)
    assert rel_full <= REL_TOL and rel_ref <= REL_TOL, (
        f"{exported.tag()} cached decode differs: vs onnx full {rel_full:.3e}, vs transformers {rel_ref:.3e}")


def test_present_key_has_kv_heads(exported: Exported):
    d = exported.manifest.model
    for v in exported.manifest.variants:
        outputs = {o.name: o.shape for o in v.outputs}
        for key, value in v.kv.present:
            kv_heads = (outputs[key][1], outputs[value][1], v.kv.num_kv_heads)
            assert kv_heads == (d.num_kv_heads,) * 3, f"{exported.tag()} {v.name}: {kv_heads}"
    expected_kv = exported.case.kwargs.get("num_key_value_heads", d.num_heads)
    assert d.num_kv_heads == expected_kv, exported.tag()


def test_left_padded_batch_equals_each_sequence_alone(exported: Exported):
    dec, pad = exported.dec, 3
    rng = np.random.default_rng(exported.seed + 2)
    a, b = exported.ids(rng, (1, SEQ)), exported.ids(rng, (1, SEQ - pad))
    ids = np.concatenate([a, np.concatenate([np.zeros((1, pad), np.int64), b], axis=1)])
    mask = np.ones_like(ids)
    mask[1, :pad] = 0

    batch_logits, past = dec.run(ids, mask, dec.empty_past(2))
    alone = [dec.run(x, np.ones_like(x), dec.empty_past(1)) for x in (a, b)]
    for row, (logits, _) in enumerate(alone):
        _, rel = rel_diff(batch_logits[row, mask[row].astype(bool)], logits[0])
        assert rel <= REL_TOL, f"{exported.tag()} row {row} of the padded batch differs from alone: {rel:.3e}"

    # 8 greedy steps, batched through the cache, vs each sequence decoded alone
    batch_tokens, batch_steps = [[], []], [[], []]
    logits = batch_logits[:, -1]
    for _ in range(PAD_GREEDY_STEPS):
        nxt = logits.argmax(-1)
        for row in range(2):
            batch_tokens[row].append(int(nxt[row]))
            batch_steps[row].append(logits[row])
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        out, past = dec.run(nxt[:, None].astype(np.int64), mask, past)
        logits = out[:, -1]
    for row, (logits, past1) in enumerate(alone):
        tokens, step_logits = _greedy_onnx(dec, logits[0, -1], past1, SEQ - pad * row, PAD_GREEDY_STEPS)
        agreed = first_divergence(batch_tokens[row], tokens, step_logits, f"{exported.tag()} padded row {row}")
        _, rel = rel_diff(np.stack(batch_steps[row][:agreed + 1]), np.stack(step_logits[:agreed + 1]))
        assert rel <= REL_TOL, f"{exported.tag()} row {row} greedy-step logits differ from alone: {rel:.3e}"


def test_greedy_tokens_match_transformers(exported: Exported):
    rng = np.random.default_rng(exported.seed + 3)
    prompt = exported.ids(rng, (1, 8))
    logits, past = exported.dec.run(prompt, np.ones_like(prompt), exported.dec.empty_past(1))
    ours, _ = _greedy_onnx(exported.dec, logits[0, -1], past, prompt.shape[1], GREEDY_STEPS)
    seq, ref, ref_logits = prompt, [], []
    for _ in range(GREEDY_STEPS):
        last = reference_logits(exported.model, seq)[0, -1]
        ref.append(int(last.argmax()))
        ref_logits.append(last)
        seq = np.concatenate([seq, [[ref[-1]]]], axis=1)
    first_divergence(ours, ref, ref_logits, exported.tag())


@pytest.mark.parametrize("case", [c for c in CASES if c.window], ids=lambda c: c.id)
def test_sliding_window_is_exercised(case: Case):
    """The window must change the reference's logits at these lengths, or parity proves nothing."""
    torch.manual_seed(case_seed(case))
    model = transformers.AutoModelForCausalLM.from_config(case.config()).eval()
    randomize(model, case_seed(case))
    ids = np.random.default_rng(case_seed(case)).integers(1, model.config.vocab_size, (1, SEQ))
    windowed = reference_logits(model, ids)
    model.config.sliding_window = 4096
    unwindowed = reference_logits(model, ids)
    tag = f"[{case.id}, PARITY_SEED={SEED}]"
    _, early = rel_diff(unwindowed[:, :case.window], windowed[:, :case.window])
    _, late = rel_diff(unwindowed[:, case.window:], windowed[:, case.window:])
    assert early <= REL_TOL, f"{tag} positions inside the window changed: {early:.3e}"
    assert late > 100 * REL_TOL, f"{tag} the window does not change the logits ({late:.3e})"


def test_fused_variant_matches_portable_and_transformers(exported: Exported):
    """The fused graph (last-position logits) through prefill + decode, on a left-padded batch."""
    names = [v.name for v in exported.manifest.variants]
    if "fused" not in names:
        pytest.skip(f"package has no fused variant ({names})")
    fused, pad, prefill = exported.decoder("fused"), 3, 5
    rng = np.random.default_rng(exported.seed + 5)
    ids = exported.ids(rng, (2, SEQ))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    full, _ = exported.dec.run(ids, mask, exported.dec.empty_past(2))
    ref = reference_logits(exported.model, ids, mask)
    logits, past = fused.run(ids[:, :prefill], mask[:, :prefill], fused.empty_past(2))
    steps = [logits[:, -1]]
    for t in range(prefill, SEQ):
        logits, past = fused.run(ids[:, t:t + 1], mask[:, :t + 1], past)
        steps.append(logits[:, -1])
    ours = np.stack(steps, axis=1)  # positions prefill-1 .. SEQ-1, all real in both rows
    _, rel_portable = rel_diff(ours, full[:, prefill - 1:])
    _, rel_ref = rel_diff(ours, ref[:, prefill - 1:])
    assert rel_portable <= REL_TOL and rel_ref <= REL_TOL, (
        f"{exported.tag()} fused decode differs: vs portable {rel_portable:.3e}, vs transformers {rel_ref:.3e}")


FAMILY_CASES = [next(c for c in CASES if c.family == f) for f in dict.fromkeys(c.family for c in CASES)]


@pytest.mark.parametrize("exported", FAMILY_CASES, indirect=True, ids=lambda c: c.id)
def test_export_with_verification_passes(exported: Exported, tmp_path):
    """One export per family through the exporter's own gate (every variant, fp32: 1e-4 relative)."""
    pkg = export(exported.source, tmp_path / "verified", precision="fp32", verify=True)
    manifest = Manifest.load(pkg)
    assert set(manifest.verification) == {v.name for v in manifest.variants}, manifest.verification
    for name, report in manifest.verification.items():
        worst = max(report.full.max_rel, report.cached.max_rel)
        assert worst <= FP32_REL_TOL, f"{exported.tag()} {name}: {report}"
        assert report.greedy.steps == GREEDY_STEPS, report


@pytest.mark.parametrize("exported", FAMILY_CASES, indirect=True, ids=lambda c: c.id)
def test_int4_export_of_every_family_runs_and_tracks_the_reference(exported: Exported, tmp_path):
    """Quantized weight paths differ per family (Conv1D, fused qkv, tied tables): every variant
    must load, stay near the fp32 reference (random tiny models measured 12-32 % mean int4 noise;
    a wrong weight layout gives ~100 %), and the variants must agree with each other (float
    activations everywhere, head_accuracy=1, so the fused graph computes what the portable one does)."""
    pkg = export(exported.source, tmp_path / "int4", precision="int4", verify=False, head_accuracy=1)
    rng = np.random.default_rng(exported.seed + 6)
    ids = exported.ids(rng, (1, SEQ))
    last = int4_variants_track(pkg, ids, reference_logits(exported.model, ids)[:, -1], exported.tag())
    assert "fused-int8" in last  # a default variant of int4 exports


HEAD_CASES = [c for c in CASES if c.id in ("llama-gqa-untied", "llama-mqa-tied")]


@pytest.mark.parametrize("exported", HEAD_CASES, indirect=True, ids=lambda c: c.id)
def test_int8_activation_head_refines_its_top_candidates_in_float(exported: Exported, tmp_path):
    """The default fused int4 head runs with int8 activations and recomputes its top 16 logits in
    float: those (and so the greedy pick) equal the float-activation head's; the rest stay close."""
    pkg = export(exported.source, tmp_path / "int4", precision="int4", verify=False, variants=("fused",))
    exact = export(exported.source, tmp_path / "int4-exact", precision="int4", verify=False, variants=("fused",),
                   head_accuracy=1)
    rng = np.random.default_rng(exported.seed + 7)
    ids = exported.ids(rng, (2, SEQ))
    out = {}
    for p in (pkg, exact):
        v = Manifest.load(p).variant("fused")
        dec = OnnxDecoder(p / v.file, v)
        out[p] = dec.run(ids, np.ones_like(ids), dec.empty_past(2))[0][:, -1]
    fast, ref = out[pkg], out[exact]
    top = np.argsort(-ref, axis=-1)[:, :8]
    _, rel_top = rel_diff(np.take_along_axis(fast, top, -1), np.take_along_axis(ref, top, -1))
    assert rel_top <= 1e-5, f"{exported.tag()} refined top logits differ by {rel_top:.2e}"
    assert (fast.argmax(-1) == ref.argmax(-1)).all(), exported.tag()
    _, rel_all = rel_diff(fast, ref)
    assert 0 < rel_all <= 5e-2, f"{exported.tag()} int8-activation head: {rel_all:.2e} from the float one"


@pytest.mark.parametrize("exported", HEAD_CASES[:1], indirect=True, ids=lambda c: c.id)
def test_int8_twins_are_their_graphs_at_accuracy_4_and_opt_in_unverified(exported: Exported, tmp_path, capsys):
    """fused-int8 / static-int8 = the fused / static graphs with their 4-bit layers at MatMulNBits
    accuracy 4 (int8 activations), sharing the weights; accuracy_level=4 runs them, the default
    only where verification recorded them at the gate (see the next test)."""
    import onnx

    import portable_infer
    from portable_infer import cli
    from portable_infer.errors import InvalidArgumentError, PackageError

    pkg = export(exported.source, tmp_path / "int4", precision="int4", verify=False)
    manifest = Manifest.load(pkg)
    assert [v.name for v in manifest.variants] == ["portable", "fused", "fused-int8", "static", "static-int8",
                                                  "static-dense"]
    assert sorted(p.name for p in pkg.glob("*.data")) == ["model.fused.onnx.data", "model.onnx.data"]
    levels = {}
    for name in ("fused", "fused-int8", "static", "static-int8"):
        g = onnx.load(str(pkg / manifest.variant(name).file), load_external_data=False).graph
        levels[name] = {(a.i, n.input[1]) for n in g.node if n.op_type == "MatMulNBits"
                        for a in n.attribute if a.name == "accuracy_level"
                        if next(b.i for b in n.attribute if b.name == "bits") == 4}
        layers = {d for _, d in levels[name] if ".nbits4." not in d}  # the -int8 lm_head's 4-bit table apart
        assert layers == {d for _, d in levels["fused"]}  # same weights
    for name, acc in (("fused", 1), ("fused-int8", 4), ("static", 1), ("static-int8", 4)):
        assert {i for i, _ in levels[name]} == {acc}, name

    def variant(**kw):
        return portable_infer.load(pkg, "cpu", intra_op_threads=2, **kw)

    assert variant().variant == "static"  # unverified twins are not preferred
    assert variant(accuracy_level=4).variant == "static-int8"
    exact, fast = variant(static_kv=False), variant(static_kv=False, accuracy_level=4)
    assert (exact.variant, fast.variant) == ("fused", "fused-int8")
    for flags, name in (([], "static"), (["--accuracy", "4"], "static-int8"),
                        (["--no-static-kv", "--accuracy", "4"], "fused-int8")):  # `bench` honours them
        assert cli.main(["bench", "--model", str(pkg), "--provider", "cpu", "--threads", "2", "--runs", "1",
                         "--prompt-tokens", "4", "--new-tokens", "2", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["variant"] == name, flags
    rng = np.random.default_rng(exported.seed + 8)
    ids = exported.ids(rng, (1, SEQ))[0].tolist()
    a, b = exact.forward_logits(ids), fast.forward_logits(ids)
    _, rel = rel_diff(b, a)
    assert 0 < rel <= 5e-2, f"{exported.tag()} fused-int8 is {rel:.2e} from fused (relative)"

    only = export(exported.source, tmp_path / "only-int8", precision="int4", verify=False, variants=("static-int8",))
    assert portable_infer.load(only, "cpu").variant == "static-int8"  # no exact twin to prefer
    with pytest.raises(PackageError, match="only int8-activation graphs"):
        portable_infer.load(only, "cpu", accuracy_level=1)

    fp32 = export(exported.source, tmp_path / "fp32", precision="fp32", verify=False)
    assert [v.name for v in Manifest.load(fp32).variants] == ["portable", "fused", "static"]
    assert portable_infer.load(fp32, "cpu").variant == "static"  # no int8 twins: float activations
    with pytest.raises(PackageError, match="no fused-int8 graph"):
        portable_infer.load(fp32, "cpu", accuracy_level=4, static_kv=False)
    with pytest.raises(InvalidArgumentError, match="fused-int8/static-int8"):
        export(exported.source, tmp_path / "bad", precision="fp32", verify=False, variants=("static-int8",))
    assert not (tmp_path / "bad").exists()


# --- precisions (one llama) -------------------------------------------------------------------------
PRECISION_CASE = CASES[0]
PRECISION_SEED = 0
EMBED_GAIN = 20.0
QUALITY_FLOOR = {"fp16": 0.9, "int8": 0.85, "int4": 0.75}


@pytest.fixture(scope="module")
def precisions(tmp_path_factory) -> dict:
    """One llama exported at every precision, each through the exporter's verification.

    Quantization flips the greedy argmax wherever the top two logits nearly tie, and plain random
    weights tie often: with :func:`randomize` alone int4 agreed on 58-77 % of the teacher-forced
    steps over 10 seeds (transformers' own init: 54-100 %), so no floor was stable. Here the
    embedding is multiplied by EMBED_GAIN (the residual stream leans on the token, as in trained
    models; the layers still change 27 % of the argmaxes) and the seed is fixed. Verification
    draws a fresh prompt each run: over 150 prompts this model's int4 agreement was 84-100 %
    (mean 97 %); with a gain of 10 one prompt in 60 fell to 71 %.
    """
    root = tmp_path_factory.mktemp("precisions")
    torch.manual_seed(PRECISION_SEED)
    model = transformers.AutoModelForCausalLM.from_config(PRECISION_CASE.config()).eval()
    randomize(model, PRECISION_SEED)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(EMBED_GAIN)
    model.save_pretrained(root / "hf")
    out = {"model": model}
    for p in ("fp32", "fp16", "int8", "int4"):  # fp32 is only the size baseline here
        pkg = export(root / "hf", root / p, precision=p, verify=p != "fp32")
        manifest = Manifest.load(pkg)
        v = manifest.variant("portable")
        out[p] = (pkg, manifest, OnnxDecoder(pkg / v.file, v))
    return out


def _package_bytes(manifest: Manifest, variant: str = "portable") -> int:
    """Bytes of one variant's graph and weights."""
    file = manifest.variant(variant).file
    return sum(f.size for f in manifest.files if f.path in (file, file + ".data"))


def test_fp16_logits_close_and_greedy_mostly_equal(precisions):
    _, manifest, dec = precisions["fp16"]
    model, tag = precisions["model"], "[fp16]"
    assert manifest.variant("portable").kv.dtype == "float16"
    rng = np.random.default_rng(PRECISION_SEED)
    ids = rng.integers(1, manifest.model.vocab_size, (2, 32), dtype=np.int64)
    ref = reference_logits(model, ids)
    ours, _ = dec.run(ids, np.ones_like(ids), dec.empty_past(2))
    _, rel = rel_diff(ours, ref)
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    assert rel <= 1e-2, f"{tag} fp16 logits relative difference {rel:.3e}"
    assert agree >= 0.9, f"{tag} fp16 top-1 agrees with fp32 transformers on {agree:.0%} of positions"

    prompt = ids[:1, :8]
    logits, past = dec.run(prompt, np.ones_like(prompt), dec.empty_past(1))
    ours_greedy, _ = _greedy_onnx(dec, logits[0, -1], past, 8, GREEDY_STEPS)
    seq = prompt
    for _ in range(GREEDY_STEPS):
        seq = np.concatenate([seq, [[reference_logits(model, seq)[0, -1].argmax()]]], axis=1)
    same = int((np.array(ours_greedy) == seq[0, 8:]).sum())
    assert same >= GREEDY_STEPS * 3 // 4, f"{tag} greedy: ours {ours_greedy}, reference {seq[0, 8:].tolist()}"
    for name, report in manifest.verification.items():
        q = report.quality
        assert q.top1_agreement >= QUALITY_FLOOR["fp16"], f"{tag} {name}: {q}"
    agreement = ", ".join(f"{n} {r.quality.agree_steps}" for n, r in manifest.verification.items())
    print(f"\nfp16: logits relative difference {rel:.2e}, greedy {same}/{GREEDY_STEPS} equal, "
          f"top-1 agreement {agreement}")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_quality_and_size(precisions, precision):
    pkg, manifest, _ = precisions[precision]
    fp32 = precisions["fp32"][1]
    tag, floor = f"[{precision}]", QUALITY_FLOOR[precision]
    kept = {v.name for v in manifest.variants}
    dropped = {n for n, r in manifest.verification.items() if r.dropped}
    assert set(manifest.verification) == kept | dropped and not kept & dropped
    for name in dropped:  # int8 twins below their gate: reported, not shipped
        assert name in ("fused-int8", "static-int8") and manifest.verification[name].quality.top1_agreement < 0.98
        assert not list(pkg.glob(f"model.{name}.*"))
    for name, report in manifest.verification.items():
        q = report.quality
        if name in dropped:
            continue
        assert q.top1_agreement >= floor, f"{tag} {name}: top-1 agreement {q.agree_steps} < {floor}: {q}"
        if name in ("fused-int8", "static", "static-int8", "static-dense"):  # the fused / portable graph's weights
            continue
        size, full = _package_bytes(manifest, name), _package_bytes(fp32, name)
        assert size < full, f"{tag} {name} graph+weights are {size} bytes, fp32's {full}"
        print(f"\n{precision} {name}: top-1 agreement {q.agree_steps}, perplexity {q.perplexity:.2f} "
              f"(reference {q.perplexity_reference:.2f}), graph+weights {size} bytes vs fp32 {full}")


@pytest.mark.parametrize("exported", HEAD_CASES[:1], indirect=True, ids=lambda c: c.id)
def test_int8_twins_below_the_floor_are_left_out_and_gated_ones_preferred(exported: Exported, tmp_path, monkeypatch,
                                                                          capsys):
    """An int8-activation twin below its floor is dropped from the package (its graph file too),
    its report kept, and the export succeeds; the loader's default prefers a twin only when its
    recorded quality passes variants.passes_gate, else runs the exact graph."""
    import portable_infer
    from portable_infer import cli
    from portable_infer.package import variants

    monkeypatch.setattr(variants, "INT8_FLOOR", {"fused-int8": 2.0, "static-int8": 0.0})  # 100 points over the twin
    pkg = export(exported.source, tmp_path / "int4", precision="int4")
    manifest = Manifest.load(pkg)
    assert [v.name for v in manifest.variants] == ["portable", "fused", "static", "static-int8", "static-dense"]
    assert "floor for int8 activations" in manifest.verification["fused-int8"].dropped
    assert not (pkg / "model.fused-int8.onnx").exists() and manifest.verify_files(pkg) is None
    assert portable_infer.load(pkg, "cpu", static_kv=False).variant == "fused"
    # the gate is measured from the exact twin's record: at most 1 - GATE_AGREEMENT below its agreement
    twin = manifest.verification["static"].quality.top1_agreement
    measured = manifest.verification["static-int8"].quality.top1_agreement + (1 - twin)
    monkeypatch.setattr(variants, "GATE_AGREEMENT", measured)  # at the bar: passes (variants.clears)
    monkeypatch.setattr(variants, "GATE_PPL_INCREASE", 1.0)
    assert portable_infer.load(pkg, "cpu").variant == "static-int8"
    assert cli.main(["inspect", str(pkg)]) == 0
    shown = capsys.readouterr().out
    assert "fused-int8: " in shown and "left out of the package: top-1 agreement" in shown
    assert "static-int8: " in shown and "runs by default" in shown
    monkeypatch.setattr(variants, "GATE_AGREEMENT", measured + 1e-6)
    assert portable_infer.load(pkg, "cpu").variant == "static"
    assert cli.main(["inspect", str(pkg)]) == 0
    assert "runs only with --accuracy 4" in capsys.readouterr().out


def test_int4_is_smaller_than_int8(precisions):
    assert _package_bytes(precisions["int4"][1]) < _package_bytes(precisions["int8"][1])


# --- helpers ----------------------------------------------------------------------------------------
def _greedy_onnx(dec: OnnxDecoder, logits: np.ndarray, past: list, length: int, steps: int):
    """Greedy tokens through the cache, from the last prompt position's logits."""
    tokens, step_logits = [], []
    for _ in range(steps):
        tok = int(logits.argmax())
        tokens.append(tok)
        step_logits.append(logits)
        length += 1
        out, past = dec.run(np.array([[tok]], np.int64), np.ones((1, length), np.int64), past)
        logits = out[0, -1]
    return tokens, step_logits


def _safetensors_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            keys.extend(st.keys())
    return keys
