"""Constrained decoding, logit bias and logprobs end to end, on the tiny text package (random
weights, one token per byte): through the Python API (BatchDecoder) and the scheduler, with
constrained and free rows in one batch.

The tiny tokenizer's end token (2) is also the byte "#", so these requests pass
``ignore_eos=True``: a JSON schema's grammar ends the row itself once the value is complete.
"""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest

import portable_infer
from portable_infer.errors import GenerationError, InvalidArgumentError

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SEED = int(os.environ.get("CONSTRAINED_SEED") or random.SystemRandom().randrange(2**31))
TAG = f"[CONSTRAINED_SEED={SEED}]"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
REGEX = r"[a-f]{3}-[0-9]{2,4}\."
END = 2  # the tiny tokenizer's end token


@pytest.fixture(scope="module")
def model(tiny_text_package):
    return portable_infer.load(tiny_text_package, "cpu", intra_op_threads=2)


def reply(model, ids):
    """The text of a constrained row's ids: a completed grammar ends on the end token (2), which
    this tokenizer decodes as "#" (real tokenizers mark it special)."""
    return model.decode(ids[:-1] if ids[-1] == END else ids)


def texts(rng, n):
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.!?"
    return ["".join(rng.choice(list(alphabet), int(rng.integers(3, 20)))) for _ in range(n)]


def test_schema_outputs_validate_at_temperature(model):
    rng = np.random.default_rng(SEED)
    print(TAG)
    prompts = texts(rng, 24)
    outs = model.batch_generate(prompts, response_format=RESPONSE_FORMAT, temperature=0.7, seed=SEED % 1000,
                                ignore_eos=True, max_new_tokens=120)
    for p, out in zip(prompts[:6], outs):  # and one by one, streamed
        pieces = list(model.stream_generate(p, response_format=RESPONSE_FORMAT, temperature=0.7, ignore_eos=True,
                                            max_new_tokens=120, seed=int(rng.integers(1000))))
        assert pieces[-1].finish_reason == "stop", f"{TAG} {pieces[-1]}"
        outs.append("".join(r.text for r in pieces))
    for out in outs:
        jsonschema.validate(json.loads(out), SCHEMA)


def test_unconstrained_outputs_are_not_json(model):
    """The check above can fail: free text from this model is no JSON."""
    rng = np.random.default_rng(SEED + 1)
    print(TAG)
    outs = model.batch_generate(texts(rng, 8), temperature=0.7, seed=1, ignore_eos=True, max_new_tokens=40)
    assert not any(o.startswith("{") and o.endswith("}") for o in outs), outs


def test_json_object_and_regex_and_grammar(model):
    rng = np.random.default_rng(SEED + 2)
    print(TAG)
    stopped = 0
    for p in texts(rng, 6):
        seed = int(rng.integers(1000))
        out = model.generate(p, constraint={"regex": REGEX}, temperature=0.7, seed=seed, ignore_eos=True)
        assert re.fullmatch(REGEX, out), f"{TAG} {out!r}"
        out = model.generate(p, constraint={"grammar": 'start: ("yes" | "no") "!"'}, temperature=0.7, seed=seed,
                             ignore_eos=True)
        assert out in ("yes!", "no!"), f"{TAG} {out!r}"
        pieces = list(model.stream_generate(p, response_format={"type": "json_object"}, temperature=0.7, seed=seed,
                                            ignore_eos=True, max_new_tokens=200,
                                            logit_bias={model.tokenizer.token_to_id('"'): 3.0}))
        out = "".join(r.text for r in pieces)
        if pieces[-1].finish_reason == "stop":
            assert isinstance(json.loads(out), dict), f"{TAG} {out!r}"
            stopped += 1
        else:  # out of tokens inside an unbounded object: what there is starts one
            assert out.startswith("{"), f"{TAG} {out!r}"
    assert stopped >= 3, TAG


def test_logit_bias_forces_and_bans(model):
    rng = np.random.default_rng(SEED + 3)
    print(TAG)
    prompt = rng.integers(3, 256, 8).tolist()
    free = model.generate_ids(prompt, max_new_tokens=12, ignore_eos=True)
    token = int(rng.integers(3, 256))
    assert model.generate_ids(prompt, max_new_tokens=12, ignore_eos=True, logit_bias={token: 100}) == [token] * 12
    banned = free[0]
    out = model.generate_ids(prompt, max_new_tokens=12, ignore_eos=True, temperature=0.9, seed=5,
                             logit_bias={banned: -100})
    assert banned not in out, f"{TAG} {out}"
    with pytest.raises(InvalidArgumentError) as e:
        model.generate_ids(prompt, logit_bias={256: 1.0})
    assert e.value.param == "logit_bias"


def test_logprobs_equal_the_forward_pass(model):
    """logprobs=True, top_logprobs=k: the chosen token's log-probability under the model (teacher
    forcing of prompt + output), and the k best."""
    from portable_infer.decode.sampling import log_softmax

    rng = np.random.default_rng(SEED + 4)
    print(TAG)
    prompt = texts(rng, 1)[0]
    pieces = list(model.stream_generate(prompt, logprobs=True, top_logprobs=3, temperature=0.8, seed=7,
                                        ignore_eos=True, max_new_tokens=10))
    ids = model.encode(prompt) + [r.token for r in pieces]
    logits = model.forward_logits(ids)
    for i, r in enumerate(pieces):
        lp = log_softmax(logits[len(ids) - len(pieces) - 1 + i])
        assert r.logprob == pytest.approx(lp[r.token], abs=1e-4)
        assert [t for t, _ in r.top_logprobs] == list(np.argsort(-lp)[:3])


@pytest.mark.parametrize("bad, param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}), "response_format"),
    (dict(constraint={"regex": "a(b"}), "constraint"),
    (dict(constraint={"grammar": "start: nope"}), "constraint"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(logprobs=False, top_logprobs=2), "top_logprobs"),
])
def test_bad_constraints_are_typed_errors(model, bad, param):
    with pytest.raises(InvalidArgumentError) as e:
        model.generate("hello", **bad)
    assert e.value.param == param
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    with Scheduler(model, SchedulerConfig(max_batch=2)) as sched, pytest.raises(InvalidArgumentError) as e:
        sched.submit("hello", **bad)
    assert e.value.param == param


def test_batch_decoder_mixes_constrained_and_free_rows(model):
    from portable_infer.decode.generate import BatchDecoder
    from portable_infer.decode.sampling import SamplingParams

    rng = np.random.default_rng(SEED + 7)
    print(TAG)
    prompts = [model.encode(p) for p in texts(rng, 4)]
    free = SamplingParams(max_new_tokens=10, ignore_eos=True)
    regex = SamplingParams(max_new_tokens=10, ignore_eos=True, constraint={"regex": REGEX}, temperature=0.7, seed=3)
    dec = BatchDecoder(model.engine, prompts, [free, regex, free, regex], max_context=model.max_context,
                       guide=model.guide, vocab_size=256)
    outs = dec.run()
    for i in (0, 2):
        assert outs[i] == model.generate_ids(prompts[i], max_new_tokens=10, ignore_eos=True), TAG
    for i in (1, 3):
        assert re.fullmatch(REGEX, reply(model, outs[i])), f"{TAG} {reply(model, outs[i])!r}"


# --- on-device greedy (static KV graphs): constrained rows take the host's logits -----------------
@pytest.fixture(scope="module")
def static(tiny_llama, tiny_text_package, tmp_path_factory):
    import dataclasses
    import shutil

    from exporters.export import export
    from portable_infer.package import manifest as mf

    out = export(tiny_llama.source, tmp_path_factory.mktemp("static_text") / "pkg", precision="fp32", verify=False,
                 variants=("fused", "static"))
    shutil.copy(tiny_text_package / "tokenizer.json", out / "tokenizer.json")
    m = mf.Manifest.load(out)
    info = dataclasses.replace(m.tokenizer, file="tokenizer.json", config_file=None)
    dataclasses.replace(m, tokenizer=info, files=mf.file_entries(out)).save(out)
    model = portable_infer.load(out, "cpu", static_kv=True, intra_op_threads=2)
    assert model.engine.greedy_on_device
    return model


def test_device_greedy_falls_back_for_constrained_rows(static, model, monkeypatch):
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    rng = np.random.default_rng(SEED + 8)
    print(TAG)
    prompts = texts(rng, 2)
    kw = dict(max_new_tokens=12, ignore_eos=True)
    assert re.fullmatch(REGEX, static.generate(prompts[0], constraint={"regex": REGEX}, **kw)), TAG
    assert static.generate(prompts[0], logit_bias={65: 100}, **kw) == "b" * 12  # token 65 is "b"
    ref = static.generate(prompts[1], max_new_tokens=5, ignore_eos=True)  # ends before the regex can
    calls = []
    forward = static.engine.forward
    monkeypatch.setattr(static.engine, "forward", lambda ids, *a, **k: calls.append(k.get("greedy", False))
                        or forward(ids, *a, **k))
    with Scheduler(static, SchedulerConfig(max_batch=4)) as sched:
        hs = [sched.submit(prompts[0], constraint={"regex": REGEX}, **kw), sched.submit(prompts[1], max_new_tokens=5, ignore_eos=True)]
        (text, _, _), (free, _, _) = _collect(hs[0]), _collect(hs[1])
    assert re.fullmatch(REGEX, text) and free == ref, f"{TAG} {text!r}"
    assert not any(calls), "a constrained row in the batch: every decode step returns logits"


def _mixed(rng, static):
    """Prompts and params: greedy rows under a regex and a schema (the argmax under the mask on the
    device), a plain greedy row (all bits set), sampling rows, free and constrained (their logits
    fetched, masked on the device), and a constrained row reading logprobs (its logits fetched
    unmasked: the step applies the mask after reading them)."""
    from portable_infer.decode.constraints import Constraint
    from portable_infer.decode.sampling import SamplingParams

    prompts = [static.encode(p) for p in texts(rng, 6)]
    kw = dict(max_new_tokens=60, ignore_eos=True)
    regex, seed = Constraint.regex(REGEX), lambda: int(rng.integers(1000))
    params = [SamplingParams(constraint=regex, **kw), SamplingParams(**kw),
              SamplingParams(constraint=Constraint.json_schema(SCHEMA), max_new_tokens=120, ignore_eos=True),
              SamplingParams(constraint=regex, temperature=0.8, seed=seed(), **kw),
              SamplingParams(temperature=0.8, seed=seed(), **kw),
              SamplingParams(constraint=regex, logprobs=2, temperature=0.8, seed=seed(), **kw)]
    return prompts, params


def _device_calls(engine, monkeypatch, on: bool) -> list:
    """Turn the device-mask path on or off for ``engine``; returns the list the masked-argmax
    companions' runs are counted in ("batch": the whole batch's graph, "rows": the lean one)."""
    from portable_infer.decode import batch_pick
    from portable_infer.engine.masked_argmax import MaskedArgmax

    calls = []
    monkeypatch.setattr(batch_pick, "DEVICE_MIN_ROWS", 1)  # every forward, down to the last live row
    monkeypatch.setattr(engine, "masks_on_device", on)
    for name, label in (("run", "batch"), ("run_rows", "rows")):
        real = getattr(MaskedArgmax, name)
        monkeypatch.setattr(MaskedArgmax, name, lambda self, *a, _r=real, _l=label: calls.append(_l) or _r(self, *a))
    return calls


def test_device_masks_pick_what_the_host_picks_in_batch_decoder(static, monkeypatch):
    """The static engine on the CPU runs the masked-argmax graph when told to (on GPUs it does by
    default): every row's tokens equal the host path's, constrained and free, greedy and sampled."""
    from portable_infer.decode.generate import BatchDecoder

    rng = np.random.default_rng(SEED + 9)
    print(TAG)
    prompts, params = _mixed(rng, static)
    events = {}
    for on in (False, True):
        calls = _device_calls(static.engine, monkeypatch, on)
        dec = BatchDecoder(static.engine, prompts, params, max_context=static.max_context, guide=static.guide,
                           vocab_size=256)
        events[on] = []
        while not dec.done:
            events[on] += dec.step()
        assert len(calls) == (dec.timings["decode_steps"] + 1 if on else 0), TAG  # prefill and every step
    assert events[True] == events[False], TAG  # tokens, finish reasons, logprobs
    outs = [r.output for r in dec.rows]
    assert re.fullmatch(REGEX, reply(static, outs[0])) and re.fullmatch(REGEX, reply(static, outs[5])), TAG
    jsonschema.validate(json.loads(reply(static, outs[2])), SCHEMA)


def test_device_draws_give_the_host_tokens_in_batch_decoder(static, monkeypatch):
    """The static engine on the CPU draws sampling rows with the sample graph when told to (on
    GPUs it does by default), beside constrained, greedy and logprobs rows: every row's tokens,
    finish reasons and logprobs equal the host path's (the same uniform numbers: one a draw)."""
    from portable_infer.decode.generate import BatchDecoder
    from portable_infer.decode.sampling import SamplingParams
    from portable_infer.engine.device_sample import DeviceSampler

    rng = np.random.default_rng(SEED + 10)
    print(TAG)
    prompts, params = _mixed(rng, static)
    kw = dict(max_new_tokens=40, ignore_eos=True)
    for filters in (dict(top_k=12), dict(top_p=0.8), dict(min_p=0.05, top_k=40, top_p=0.95)):
        prompts.append(prompts[len(prompts) % 6])
        params.append(SamplingParams(temperature=float(rng.uniform(0.6, 1.2)), seed=int(rng.integers(1000)),
                                     **filters, **kw))
    runs, real = [], DeviceSampler.sample
    monkeypatch.setattr(DeviceSampler, "sample", lambda self, *a: runs.append(len(a[1])) or real(self, *a))
    events = {}
    for on in (False, True):
        monkeypatch.setattr(static.engine, "samples_on_device", on)
        dec = BatchDecoder(static.engine, prompts, params, max_context=static.max_context, guide=static.guide,
                           vocab_size=256)
        events[on] = []
        while not dec.done:
            events[on] += dec.step()
        if not on:
            assert not runs
    assert events[True] == events[False], TAG
    drawn = [len(r.output) for r, p in zip(dec.rows, params) if p.drawn_plain]
    assert len(runs) == max(drawn) and runs[0] == len(drawn) == 4, runs  # every forward while one draws


@pytest.mark.parametrize("mode", ["check", "device"])
def test_an_engine_that_overlaps_the_host_fills_masks_inside_the_step(static, monkeypatch, mode):
    """Where the engine's run returns before the device is done (``overlaps_host``: CUDA), the
    grammar masks (and the tokens fed to the matchers) are filled on the step's own thread, between
    the run, asked not to wait for the device, and the wait for its outputs: no worker thread.
    The tokens, finish reasons and logprobs equal the worker thread's (on the CPU the run waits
    anyway: the order and the options are what is shown here; the overlap itself on CUDA)."""
    import threading

    from portable_infer.decode import batch_pick, masks
    from portable_infer.decode.generate import BatchDecoder
    from portable_infer.engine.cuda_graphs import NO_SYNC_KEY

    rng = np.random.default_rng(SEED + 13)
    print(TAG)
    prompts, params = _mixed(rng, static)
    if mode == "check":  # every row greedy: the graph's argmax, checked
        prompts, params = prompts[:3], params[:3]
    events, order = {}, []
    session = static.engine.session
    real_run, real_fill = session.run_with_iobinding, masks._feed_and_fill

    def run(binding, options=None):
        try:
            nosync = options.get_run_config_entry(NO_SYNC_KEY) == "1"
        except (AttributeError, RuntimeError):  # no options, or the key unset
            nosync = False
        order.append("run+nosync" if nosync else "run")
        return real_run(binding, options)

    def fill(*a):
        order.append("fill" if threading.current_thread() is threading.main_thread() else "fill on a worker")
        return real_fill(*a)

    monkeypatch.setattr(session, "run_with_iobinding", run)
    monkeypatch.setattr(masks, "_feed_and_fill", fill)
    for overlap in (False, True):
        _device_calls(static.engine, monkeypatch, mode == "device")
        monkeypatch.setattr(static.engine, "overlaps_host", overlap)
        dec = BatchDecoder(static.engine, prompts, params, max_context=static.max_context, guide=static.guide,
                           vocab_size=256)
        assert dec._mode == mode, TAG
        order.clear()
        events[overlap] = []
        while not dec.done:
            events[overlap] += dec.step()
        steps = [e for e in order if e != "fill on a worker" or not overlap]  # the decode steps (prefill: made)
        if overlap:
            # the first token comes from the prefill's logits (a fill, no run); then each step's run, its fill
            assert steps[:3] == ["fill", "run+nosync", "fill"] and set(steps) <= {"run+nosync", "fill"}, (TAG, steps)
            assert steps[1::2] == ["run+nosync"] * len(steps[1::2]) and len(steps) > 5, (TAG, steps)
        else:
            assert "fill" not in steps and "run+nosync" not in steps and "fill on a worker" in steps, (TAG, steps)
    assert events[True] == events[False], TAG
    assert batch_pick.mask_fill(static.engine, batch_pick.HOST, [None])._reply is None  # nothing to fill


@pytest.mark.parametrize("slots", [False, True])
def test_the_scheduler_fills_masks_inside_the_step_where_the_engine_overlaps_the_host(static, monkeypatch, slots):
    """The scheduler's running batch (restacked or slots) takes the same inline fill as the
    BatchDecoder where the engine overlaps the host: constrained and free requests together give
    the tokens they give with the worker thread."""
    import threading

    from portable_infer.decode import masks
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    rng = np.random.default_rng(SEED + 15)
    print(TAG)
    prompts = texts(rng, 3)
    kw = dict(max_new_tokens=14, ignore_eos=True)
    subs = [dict(constraint={"regex": REGEX}, **kw), dict(**kw), dict(response_format=RESPONSE_FORMAT, **kw)]
    _device_calls(static.engine, monkeypatch, True)
    real_fill, threads = masks._feed_and_fill, []
    monkeypatch.setattr(masks, "_feed_and_fill", lambda *a: threads.append(threading.current_thread().name)
                        or real_fill(*a))
    outs = {}
    for overlap in (False, True):
        monkeypatch.setattr(static.engine, "overlaps_host", overlap)
        threads.clear()
        with Scheduler(static, SchedulerConfig(max_batch=4, slot_batch=slots)) as sched:
            handles = [sched.submit(p, **k) for p, k in zip(prompts, subs)]
            outs[overlap] = [[r.token for r in h if r.token is not None] for h in handles]
        on_loop = {t.startswith("portable-infer-scheduler") for t in threads}
        assert on_loop == ({True} if overlap else {False}), (TAG, set(threads))
    assert outs[True] == outs[False], TAG


def test_greedy_rows_check_the_argmax_before_masking(static, monkeypatch):
    """Greedy constrained rows take the graph's own argmax where their grammar allows it (check
    mode) and the argmax under the mask only where it refuses: the same tokens as masking every
    row first, with the refused rows' masks applied on the host or by the companion graph, which
    runs only on steps with a refusal."""
    from portable_infer.decode import batch_pick
    from portable_infer.decode.constraints import Constraint
    from portable_infer.decode.generate import BatchDecoder
    from portable_infer.decode.sampling import SamplingParams

    rng = np.random.default_rng(SEED + 11)
    print(TAG)
    prompts = [static.encode(p) for p in texts(rng, 4)]
    kw = dict(max_new_tokens=40, ignore_eos=True)
    loose = Constraint.regex(r"[a-z .,]{5,40}")  # most bytes allowed: the argmax often passes
    params = [SamplingParams(constraint=loose, **kw), SamplingParams(constraint=Constraint.regex(REGEX), **kw),
              SamplingParams(**kw), SamplingParams(constraint=Constraint.json_schema(SCHEMA), max_new_tokens=120,
                                                   ignore_eos=True)]

    def run(masks_on, mode=None, check=True):
        calls = _device_calls(static.engine, monkeypatch, masks_on)
        if mode is not None:
            monkeypatch.setattr(batch_pick, "mode", lambda engine, seqs: mode)
        if not check:
            monkeypatch.setattr(batch_pick, "allows", lambda mask, token: False)
        modes = []
        real = batch_pick.row_inputs
        monkeypatch.setattr(batch_pick, "row_inputs", lambda how, *a: modes.append(how) or real(how, *a))
        dec = BatchDecoder(static.engine, prompts, params, max_context=static.max_context, guide=static.guide,
                           vocab_size=256)
        outs = dec.run()
        monkeypatch.undo()
        assert set(calls) <= {"rows"}, TAG  # greedy rows: the lean companion only
        return outs, modes, len(calls)

    reference, modes, _ = run(False, mode=batch_pick.HOST, check=False)  # every mask applied first
    assert set(modes) == {batch_pick.HOST}, TAG
    host, modes, companion = run(False)
    assert set(modes) == {batch_pick.CHECK} and companion == 0, TAG
    device, _, companion = run(True)
    assert host == reference and device == reference, TAG
    # the loose row's argmax passed on some steps, and then nothing ran for it
    passed = run(False, mode=batch_pick.HOST)[0]
    assert passed == reference, TAG
    steps = len(modes)
    assert 0 < companion <= steps, (TAG, companion, steps)
    assert re.fullmatch(REGEX, reply(static, device[1])), TAG
    jsonschema.validate(json.loads(reply(static, device[3])), SCHEMA)


def test_a_token_the_grammar_forces_needs_no_device_pick(static, monkeypatch):
    """A greedy row whose grammar allows one token only takes it without its logits: no companion
    run, no logits to the host; the tokens equal masking every row first."""
    from portable_infer.decode import batch_pick
    from portable_infer.decode.constraints import Constraint
    from portable_infer.decode.generate import BatchDecoder
    from portable_infer.decode.sampling import SamplingParams

    rng = np.random.default_rng(SEED + 14)
    print(TAG)
    word = "".join(rng.choice(list("abcdefgh"), 6))
    prompts = [static.encode(p) for p in texts(rng, 3)]
    params = [SamplingParams(constraint=Constraint.regex(word), max_new_tokens=12, ignore_eos=True),
              SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(constraint=Constraint.regex(word + "[0-9]{2}"), max_new_tokens=12, ignore_eos=True)]
    outs = {}
    for masks_on, mode in ((False, batch_pick.HOST), (True, None)):
        calls = _device_calls(static.engine, monkeypatch, masks_on)
        if mode is not None:
            monkeypatch.setattr(batch_pick, "mode", lambda engine, seqs: mode)
        dec = BatchDecoder(static.engine, prompts, params, max_context=static.max_context, guide=static.guide,
                           vocab_size=256)
        outs[mode] = dec.run()
        monkeypatch.undo()
        if mode is None:  # check mode: the word's letters are forced; only the digits need a pick
            assert dec._mode == batch_pick.CHECK, TAG
            assert len(calls) <= 2, (TAG, calls)  # the two digits at most
    assert outs[None] == outs[batch_pick.HOST], TAG
    assert reply(static, outs[None][0]) == word and re.fullmatch(word + "[0-9]{2}", reply(static, outs[None][2])), TAG


def test_check_mode_goes_on_after_the_last_constrained_row_ends(static, monkeypatch):
    """A batch in check mode whose constrained rows all end (their grammar complete) while plain
    greedy rows go on: no masks are filled any more, and the plain rows decode as they do alone."""
    from portable_infer.decode import batch_pick
    from portable_infer.decode.constraints import Constraint
    from portable_infer.decode.generate import BatchDecoder
    from portable_infer.decode.sampling import SamplingParams

    rng = np.random.default_rng(SEED + 12)
    print(TAG)
    prompts = [static.encode(p) for p in texts(rng, 3)]
    kw = dict(max_new_tokens=24, ignore_eos=True)
    params = [SamplingParams(constraint=Constraint.regex(r"[a-z]{2}"), **kw), SamplingParams(**kw),
              SamplingParams(**kw)]
    for on in (False, True):
        _device_calls(static.engine, monkeypatch, on)
        dec = BatchDecoder(static.engine, prompts, params, max_context=static.max_context, guide=static.guide,
                           vocab_size=256)
        assert dec._mode == batch_pick.CHECK, TAG
        outs = dec.run()
        assert dec.rows[0].finish_reason == "stop" and len(outs[0]) < len(outs[1]) == 24, TAG
        # the grammar completes on the second letter; the row ends on the end token (ignore_eos or not)
        assert len(outs[0]) == 3 and outs[0][-1] == END, (TAG, outs[0])
        assert re.fullmatch(r"[a-z]{2}", reply(static, outs[0])), TAG
        for i in (1, 2):
            alone = BatchDecoder(static.engine, [prompts[i]], [params[i]], max_context=static.max_context)
            assert alone.run()[0] == outs[i], TAG
        monkeypatch.undo()


def test_device_masks_pick_what_the_host_picks_in_the_scheduler(static, monkeypatch):
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    rng = np.random.default_rng(SEED + 10)
    print(TAG)
    prompts, params = _mixed(rng, static)
    outs = {}
    for on in (False, True):
        calls = _device_calls(static.engine, monkeypatch, on)
        with Scheduler(static, SchedulerConfig(max_batch=8)) as sched:
            handles = [sched.submit(p, **{k: getattr(sp, k) for k in ("max_new_tokens", "ignore_eos", "constraint",
                                                                        "temperature", "seed", "logprobs")})
                       for p, sp in zip(prompts, params)]
            outs[on] = [_collect(h)[1] for h in handles]
        assert bool(calls) == on, TAG
    assert outs[True] == outs[False], TAG


# --- continuous batching --------------------------------------------------------------------------
def _collect(handle):
    pieces = list(handle)
    return "".join(r.text for r in pieces), [r.token for r in pieces if r.token is not None], pieces[-1].finish_reason


def test_scheduler_mixes_constrained_and_free_rows(model):
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    rng = np.random.default_rng(SEED + 5)
    print(TAG)
    prompts = texts(rng, 8)
    free_ref = {i: model.generate_ids(model.encode(p), max_new_tokens=16, ignore_eos=True)
                for i, p in enumerate(prompts) if i % 2}
    with Scheduler(model, SchedulerConfig(max_batch=8)) as sched:
        handles = [sched.submit(p, max_new_tokens=16, ignore_eos=True) if i % 2 else
                   sched.submit(p, response_format=RESPONSE_FORMAT, temperature=0.7, seed=i, ignore_eos=True,
                                max_new_tokens=120)
                   for i, p in enumerate(prompts)]
        results = [_collect(h) for h in handles]
    for i, (text, ids, reason) in enumerate(results):
        if i % 2:
            assert ids == free_ref[i], f"{TAG} row {i}"
        else:
            assert reason == "stop", f"{TAG} {text!r}"
            jsonschema.validate(json.loads(text), SCHEMA)


def test_a_broken_matcher_ends_its_row_only(model, monkeypatch):
    """A row whose grammar fails mid-run (here its matcher refuses its 4th token) ends with a
    GenerationError; the free and constrained rows beside it finish as they do alone."""
    from portable_infer.decode import sequence
    from portable_infer.decode.constraints import Constraint
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig

    rng = np.random.default_rng(SEED + 6)
    print(TAG)
    prompts = texts(rng, 3)
    kw = dict(max_new_tokens=12, ignore_eos=True)
    alone = [model.generate(prompts[0], **kw), model.generate(prompts[1], constraint={"regex": REGEX}, **kw)]
    doomed_regex = REGEX.replace(".", "!")
    doomed, consumed = set(), []
    make, consume = model.guide.matcher, sequence.consume

    def matcher(constraint):  # remember the matchers of the doomed request's constraint
        m = make(constraint)
        if constraint == Constraint.regex(doomed_regex):
            doomed.add(id(m))
        return m

    def flaky(m, token):
        if id(m) in doomed:
            if len(consumed) == 3:
                raise GenerationError("the grammar broke", reason="grammar")
            consumed.append(token)
        consume(m, token)

    monkeypatch.setattr(model.guide, "matcher", matcher)
    monkeypatch.setattr(sequence, "consume", flaky)
    with Scheduler(model, SchedulerConfig(max_batch=4)) as sched:
        handles = [sched.submit(prompts[0], **kw), sched.submit(prompts[1], constraint={"regex": REGEX}, **kw),
                   sched.submit(prompts[2], constraint={"regex": doomed_regex}, **kw)]
        free, ok = _collect(handles[0])[0], _collect(handles[1])[0]
        with pytest.raises(GenerationError) as e:
            _collect(handles[2])
    assert e.value.reason == "grammar" and len(consumed) == 3
    assert [free, ok] == alone
