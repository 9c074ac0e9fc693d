"""The CPU comparison harness's pure parts (benchmarks/): no runtime is run, nothing is timed."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "runners")]

import common  # noqa: E402
import compare_cpu  # noqa: E402
import llama1b  # noqa: E402
import setup_competitors  # noqa: E402
import smollm2_float  # noqa: E402

SEED = 20261202


def _rope_hf(x, pos, theta=10000.0):
    """transformers' rotate-half RoPE on [..., d]: pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _rope_interleaved(x, pos, theta=10000.0):
    """llama.cpp's llama-architecture RoPE: pairs (2i, 2i + 1)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def test_gguf_permutation_gives_llamacpp_the_same_attention_scores():
    rng = np.random.default_rng(SEED)
    print("seed", SEED)
    heads, kv_heads, d, hidden = 4, 2, 8, 16
    wq = rng.standard_normal((heads * d, hidden))
    wk = rng.standard_normal((kv_heads * d, hidden))
    x1, x2 = rng.standard_normal(hidden), rng.standard_normal(hidden)
    q_hf = _rope_hf((wq @ x1).reshape(heads, d), 5)
    k_hf = _rope_hf((wk @ x2).reshape(kv_heads, d), 2)
    pq, pk = llama1b.permute_for_gguf(wq, heads), llama1b.permute_for_gguf(wk, kv_heads)
    q_cpp = _rope_interleaved((pq @ x1).reshape(heads, d), 5)
    k_cpp = _rope_interleaved((pk @ x2).reshape(kv_heads, d), 2)
    group = heads // kv_heads
    for h in range(heads):
        assert q_cpp[h] @ k_cpp[h // group] == pytest.approx(q_hf[h] @ k_hf[h // group])
    # Unpermuted weights under llama.cpp's RoPE give other scores: the check above can fail.
    q_wrong = _rope_interleaved((wq @ x1).reshape(heads, d), 5)
    k_wrong = _rope_interleaved((wk @ x2).reshape(kv_heads, d), 2)
    assert q_wrong[0] @ k_wrong[0] != pytest.approx(q_hf[0] @ k_hf[0])


def test_gguf_names_follow_convert_hf_to_gguf():
    names = {n: llama1b.gguf_name(n) for n, _ in llama1b.tensor_shapes()}
    assert names["model.embed_tokens.weight"] == "token_embd.weight"
    assert names["model.norm.weight"] == "output_norm.weight"
    assert names["model.layers.3.self_attn.o_proj.weight"] == "blk.3.attn_output.weight"
    assert names["model.layers.15.mlp.down_proj.weight"] == "blk.15.ffn_down.weight"
    assert names["model.layers.0.post_attention_layernorm.weight"] == "blk.0.ffn_norm.weight"
    assert len(set(names.values())) == len(names) == 2 + 9 * 16
    assert "lm_head.weight" not in names  # tied


def test_llama1b_shapes_are_llama_3_2_1b():
    shapes = dict(llama1b.tensor_shapes())
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 1_235_814_400  # Llama-3.2-1B's parameter count (tied head counted once)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2048, 8192)


def test_gpu_shapes_are_the_real_models(tmp_path):
    """The GPU runs' random-weight shapes over SmolLM2's config.json: Llama-3.1-8B and -3.2-3B's
    parameter counts, and a shape that names no head_dim gets width / heads (not SmolLM2's 64)."""
    import json

    import gpu_agent_export as gae
    import gpu_serving

    assets = tmp_path  # SmolLM2-135M-Instruct's config.json, the fields a shape may inherit
    (assets / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536, "head_dim": 64,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0},
        "_name_or_path": "x"}))
    cfg8 = gae.shape_config(assets, gae.LLAMA8B)
    assert cfg8["head_dim"] == 128 and gae.shape_params(cfg8) == 8_030_261_248  # Llama-3.1-8B
    assert gae.shape_params(gae.shape_config(assets, gpu_serving.LLAMA3B)) == 3_212_749_824  # Llama-3.2-3B
    no_dim = {k: v for k, v in gae.LLAMA8B.items() if k != "head_dim"}
    assert gae.shape_config(assets, no_dim)["head_dim"] == 128


def test_trivial_tokenizer_vocab():
    tokens = llama1b.vocab()
    assert len(tokens) == 128256
    assert tokens[llama1b.BOS] == "<|begin_of_text|>" and tokens[llama1b.EOT] == "<|eot_id|>"
    assert tokens[ord("a")] == "a" and tokens[ord("\n")] == "Ċ" and tokens[ord(" ")] == "Ġ"


def test_next_token_stats_by_hand():
    ids = [2, 0, 1]
    logits = np.array([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [9.0, 9.0, 9.0]])
    argmax, nll = common.next_token_stats(logits, ids)
    assert argmax == [0, 0]
    # position 0: uniform over 3, target 0 -> log 3; position 1: softmax (3, 1, 1)/5, target 1 -> log 5
    assert nll == pytest.approx([math.log(3.0), math.log(5.0)])
    with pytest.raises(RuntimeError, match="expected shape"):
        common.next_token_stats(logits[:2], ids)


def test_quality_counts_agreement_and_perplexity():
    ids = [2, 0, 1]
    logits = np.array([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [9.0, 9.0, 9.0]])
    rt = common.Runtime(load=None, generate=None, teacher_forced=None, files=[],
                        logits=lambda model, x: logits)
    ref = {"texts": [{"name": "t", "ids": ids, "argmax": [0, 2], "nll": [0.5, 0.5]}]}
    q = common.quality(rt, None, ref)
    assert (q["agreement"], q["positions"]) == (1, 2)
    assert q["ppl"] == pytest.approx(math.sqrt(15.0), rel=1e-4)  # exp((log 3 + log 5) / 2)
    assert q["ref_ppl"] == pytest.approx(math.exp(0.5), rel=1e-4)


def test_select_per_model_and_unknown_names():
    plan = compare_cpu.select(["smollm2", "llama1b"], ["portable_infer", "llamacpp-q4_k"])
    assert plan == {"smollm2": ["portable_infer"], "llama1b": ["portable_infer", "llamacpp-q4_k_m"]}
    plan = compare_cpu.select(["smollm2"], ["portable_infer-", "ortgenai"])
    assert plan == {"smollm2": ["portable_infer-int8act", "portable_infer-fp32", "ortgenai-fp32",
                                "ortgenai-int4"]}
    with pytest.raises(SystemExit, match="no such runtime"):
        compare_cpu.select(["llama1b"], ["optimum"])
    with pytest.raises(SystemExit, match="no such model"):
        compare_cpu.select(["llama8b"], None)


def test_only_the_selected_rows_packages_are_exported(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(compare_cpu.steps, "run_logged", lambda cmd, *a, **k: calls.append(cmd))
    bm = compare_cpu.MODELS["smollm2"]
    bm = compare_cpu.BenchModel(title="t", rows=bm.rows, packages=(
        compare_cpu.Package("package", tmp_path / "int4", "default", "int4"),
        compare_cpu.Package("package-fp32", tmp_path / "fp32", "default", "fp32")))
    compare_cpu.ensure_packages(bm, ["portable_infer", "ortgenai-int4"], None)
    assert [c[c.index("--precision") + 1] for c in calls] == ["int4"]


def test_every_row_names_its_models_files_and_the_float_checkpoint_is_exported_verified():
    """Each row's files key exists in its model (the GGUF of smollm2 is looked up); setup knows
    every model; the float checkpoint's package is exported with verification, because its
    portable_infer row is what load() chooses, and the gate reads verification's records."""
    for name, bm in compare_cpu.MODELS.items():
        for row, entry in bm.rows.items():
            assert entry.model in bm.files or (name, entry.model) == ("smollm2", "gguf"), (name, row)
    assert set(compare_cpu.MODELS) == set(setup_competitors.MODELS_KNOWN)
    bm = compare_cpu.MODELS["smollm2-float"]
    for pkg in bm.packages:  # the default one and the symmetric one (its twin's gate read too)
        assert pkg.source == str(smollm2_float.HF) and "--no-verify" not in pkg.flags
    assert {p.key for p in bm.packages} == {"package", "package-sym"}
    assert "--symmetric" in next(p for p in bm.packages if p.key == "package-sym").flags
    assert (bm.reference, bm.quality) == (smollm2_float.REFERENCE, smollm2_float.QUALITY)
    assert bm.rows["portable_infer"].extra == () and bm.rows["portable_infer-exact"].extra == ("--accuracy", "1")


def test_table_is_headed_by_the_cpu_line():
    row = {"runtime": "portable_infer", "load_s": 1.0, "ttft_ms": 50.0, "decode_tok_s": 20.0,
           "batch8_tok_s": 60.0, "peak_rss_mib": 900.0, "size_mib": 700.0, "agreement": 120,
           "agreement_of": 128, "quality": {"agreement": 600, "positions": 636, "ppl": 10.1,
                                            "ref_ppl": 10.0, "ppl_vs_ref_pct": 1.0}}
    table = compare_cpu.markdown_table([row], 2, 3, "M", host="CPU: X | ISA: avx2 fma | 2 threads")
    lines = table.splitlines()
    assert lines[0] == "CPU: X | ISA: avx2 fma | 2 threads"
    assert "ppl (ref 10.000)" in lines[2] and "| 600/636 | 10.100 (+1.00 %) |" in lines[4]
    assert compare_cpu.host_line().startswith("CPU: ") and "ISA: " in compare_cpu.host_line()


def test_rounds_shuffle_the_rows_and_pair_each_rounds_ratio(capsys):
    """compare_cpu --rounds: every row once per round, quality only in the first, the order
    shuffled after it; decode / TTFT the medians over the rounds and the speedups the medians of
    each round's own ratios (a drift that hits a round's rows alike leaves them alone)."""
    import random
    import statistics

    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    names = ["portable_infer", "ortgenai-int4", "llamacpp-q4_1"]
    speed = {"portable_infer": 100.0, "ortgenai-int4": 125.0, "llamacpp-q4_1": 80.0}
    drift = [rng.uniform(0.5, 1.5) for _ in range(5)]  # the machine's speed, round by round
    calls = []

    def run(name, first):
        k = sum(1 for n, _ in calls if n == name)
        calls.append((name, first))
        return {"runtime": name, "decode_tok_s": speed[name] * drift[k], "ttft_ms": 1000 / (speed[name] * drift[k]),
                **({"quality": {"agreement": 1}} if first else {})}

    rows = compare_cpu.run_rounds("m", names, 5, seed, run)
    assert [n for n, _ in calls[:3]] == names and all(f for _, f in calls[:3]) and not any(f for _, f in calls[3:])
    assert sorted(n for n, _ in calls) == sorted(names * 5)
    by = {r["runtime"]: r for r in rows}
    for name in names:
        want = statistics.median(speed[name] * d for d in drift)
        assert by[name]["decode_tok_s"] == pytest.approx(want) and len(by[name]["rounds"]) == 5
        assert "quality" in by[name]
    # the drift is paired away: each round's ratio is the true one
    assert by["ortgenai-int4"]["paired"]["decode"] == pytest.approx(0.8)
    assert by["llamacpp-q4_1"]["paired"]["decode"] == pytest.approx(1.25)
    assert by["llamacpp-q4_1"]["paired"]["ttft"] == pytest.approx(1.25)
    assert compare_cpu.speedups(by["ortgenai-int4"], by["portable_infer"]) == ("0.80x", "0.80x")
    calls.clear()
    one = compare_cpu.run_rounds("m", names, 1, seed, run)
    assert all("paired" not in r and "rounds" not in r for r in one)


def test_genai_pool_is_set_to_the_budget_wherever_its_config_keeps_it(tmp_path):
    """gpu_serving's --budget-streams (gpu_genai_engine.genai_blocks): every num_blocks in GenAI's config takes the budget's blocks,
    the paths changed are reported, other keys stay; a config without one reports none."""
    import json

    import gpu_genai_engine

    rng = np.random.default_rng(SEED)
    old, new = (int(x) for x in rng.integers(100, 1000, 2))
    print(f"seed {SEED}: num_blocks {old} -> {new}")
    cfg = {"model": {"decoder": {"session_options": {"log_id": "x"}}},
           "engine": {"dynamic_batching": {"num_blocks": old, "block_size": 128}}, "search": {"max_length": 8192}}
    (tmp_path / "genai_config.json").write_text(json.dumps(cfg))
    assert gpu_genai_engine.genai_blocks(tmp_path, new) == [f".engine.dynamic_batching.num_blocks: {old} -> {new}"]
    got = json.loads((tmp_path / "genai_config.json").read_text())
    assert got["engine"]["dynamic_batching"] == {"num_blocks": new, "block_size": 128}
    assert got["search"] == cfg["search"] and got["model"] == cfg["model"]
    (tmp_path / "genai_config.json").write_text(json.dumps({"search": {"max_length": 8192}}))
    assert gpu_genai_engine.genai_blocks(tmp_path, new) == []


def test_paired_rounds_pair_each_round_with_genais_own_and_count_the_target():
    """gpu_serving --paired: each round's ratio is ours over GenAI's of that round (a drift of the
    machine that hits both rows of a round alike leaves it alone), per config and level: median,
    min, max and the rounds at the 1.2x target; one GenAI figure against several rounds would not."""
    import gpu_serving

    rng = np.random.default_rng(SEED)
    drift = rng.uniform(0.6, 1.4, 5)  # the machine's speed, round by round
    print(f"seed {SEED}: drift {np.round(drift, 3).tolist()}")
    true = {("slots", 64): [1.25, 1.15, 1.3, 1.22, 1.21], ("slots", 256): [1.3] * 5, ("paged", 64): [0.9, 1.01, 1.1, 1.21, 1.19]}
    pairs = [{"config": c, "streams": n, "round": k + 1, "ours": {"tok_s": 6000 * r * d}, "genai": {"tok_s": 6000 * d}}
             for (c, n), ratios in true.items() for k, (r, d) in enumerate(zip(ratios, drift))]
    got = {(r["config"], r["streams"]): r for r in gpu_serving.paired_rounds(pairs)}
    assert set(got) == set(true)
    for key, ratios in true.items():
        r = got[key]
        assert r["ratios"] == pytest.approx(ratios) and r["rounds"] == 5
        assert (r["median"], r["min"], r["max"]) == pytest.approx((float(np.median(ratios)), min(ratios), max(ratios)))
    assert [got[k]["at_target"] for k in true] == [4, 5, 1]
    assert gpu_serving.paired_rounds(pairs, target=1.0)[2]["at_target"] == 4
    assert gpu_serving.paired_rounds([]) == []


class _Out:
    def __init__(self, created, stamps, span, tokens, error=None):
        self.created_time, self.timestamps, self.lifespan = created, stamps, span
        self.generated_tokens, self.error = [7] * tokens, error


class _FakeCB:
    """transformers' generate_batch as gpu_hf_batching calls it: the outputs it was told to give."""

    def __init__(self, outs):
        self.outs, self.calls = outs, []

    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None,
                       record_timestamps=False, progress_bar=False, persistent_manager=False, warmup=True):
        self.calls.append({"inputs": inputs, "config": continuous_batching_config, "stamps": record_timestamps,
                           "max_new_tokens": generation_config.max_new_tokens})
        return {str(i): o for i, o in enumerate(self.outs)}


def test_transformers_levels_read_ttft_gaps_and_requests_at_once_from_its_outputs():
    """gpu_hf_batching.level: TTFT = first token's stamp - creation, gaps between stamps, tok/s
    over first creation -> last stamp, and the most requests whose scheduled-to-finished spans overlap."""
    import gpu_hf_batching as hfb

    outs = [_Out(0.0, [0.5, 0.6, 0.8], (0.1, 0.8), 3),  # spans 0.1-0.8, 0.2-1.0, 0.9-1.2: two at once at most
            _Out(0.0, [0.7, 1.0], (0.2, 1.0), 2),
            _Out(0.1, [1.1, 1.2], (0.9, 1.2), 2)]
    model = _FakeCB(outs)
    kwargs, gen_fields, used = hfb.batching_kwargs(model, budget_tokens=1000, page=256)
    assert used["num_blocks"] == 3 and used.get("page_size", used.get("block_size")) == 256
    r = hfb.level(model, [[1, 2], [3], [4]], 3, kwargs, gen_fields, eos=99)
    assert model.calls[0]["stamps"] is True and model.calls[0]["max_new_tokens"] == 3
    assert r["tokens"] == 7 and r["running_max"] == 2 and r["errors"] == 0
    assert math.isclose(r["wall_s"], 1.2) and math.isclose(r["tok_s"], 7 / 1.2)
    assert math.isclose(r["ttft_p50_ms"], 700.0) and math.isclose(r["ttft_p99_ms"], 1e3 * np.percentile([0.5, 0.7, 1.0], 99))
    assert math.isclose(r["itl_p99_ms"], 1e3 * np.percentile([0.1, 0.2, 0.3, 0.1], 99))
    outs[1].error = "boom"
    assert hfb.level(model, [[1], [2], [3], [4]], 3, kwargs, gen_fields, eos=99)["errors"] == 2  # 1 failed + 1 missing


def test_the_device_draw_benchmark_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """gpu_sample.py's dry run (the CPU EP, a small vocabulary): every setting's device tokens
    agree with the host's, and the flat top-p rows ran again with the vocabulary sorted."""
    import gpu_sample

    monkeypatch.setattr(sys, "argv", ["gpu_sample.py", "--provider", "cpu", "--rows", "4", "--vocab", "3000",
                                      "--repeat", "1", "--host-rows", "4", "--out", str(tmp_path)])
    gpu_sample.main()
    rows = [line.split("|")[1:-1] for line in (tmp_path / "gpu_sample.md").read_text().splitlines()[2:]]
    assert len(rows) == 2 * len(gpu_sample.FILTERS), rows
    assert all(r[5].strip() == "4/4" for r in rows), rows
    assert int(rows[2][6]) == 4 and rows[2][2].strip() == "top-p 0.9" and rows[2][1].strip() == "1", rows


def test_a_runtime_row_is_paired_with_the_row_of_ours_it_names():
    """compare_cpu's BenchModel.against: the 1B table's GenAI row at block 128 is measured against
    our row at block 128, each round's ratio paired, and the note says so; rows without a pair of
    theirs keep portable_infer."""
    import compare_cpu

    bm = compare_cpu.MODELS["llama1b"]
    assert bm.base_of("ortgenai-int4-b128") == "portable_infer-b128-int8act"
    for m in ("llama1b", "smollm2-float"):  # GenAI's symmetric int4 against ours at symmetric int4
        assert compare_cpu.MODELS[m].base_of("ortgenai-int4-vs-sym") == "portable_infer-sym-int8act"
    assert compare_cpu.MODELS["smollm2"].base_of("ortgenai-int4") == "portable_infer"
    names = ["portable_infer-int8act", "ortgenai-int4", "portable_infer-b128-int8act", "ortgenai-int4-b128"]
    speed = {"portable_infer-int8act": 50.0, "ortgenai-int4": 50.0, "portable_infer-b128-int8act": 60.0,
             "ortgenai-int4-b128": 75.0}
    drift = iter([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.3, 1.3, 1.3, 1.3])

    def run(name, first):  # a round's rows share its drift whatever their order
        d = next(drift)
        return {"runtime": name, "decode_tok_s": speed[name] * d, "ttft_ms": 1000 / (speed[name] * d),
                "agreement": 1, "agreement_of": 2, **{k: 1.0 for _, k, _ in compare_cpu.COLUMNS
                                                       if k not in ("decode_tok_s", "ttft_ms")}}

    rows = {r["runtime"]: r for r in compare_cpu.run_rounds("llama1b", names, 3, 1, run, bm.base_of)}
    assert rows["ortgenai-int4-b128"]["paired"]["decode"] == pytest.approx(0.8)
    assert rows["ortgenai-int4"]["paired"]["decode"] == pytest.approx(1.0)
    assert "paired" not in rows["portable_infer-int8act"] and "paired" not in rows["portable_infer-b128-int8act"]
    table = compare_cpu.markdown_table(list(rows.values()), 2, 3, "M", host="CPU: X", rounds=3, base_of=bm.base_of)
    line = next(x for x in table.splitlines() if x.startswith("| ortgenai-int4-b128 "))
    assert line.split("|")[-3].strip() == "0.80x"
    assert "ortgenai-int4-b128 against portable_infer-b128-int8act" in table
