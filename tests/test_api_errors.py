"""Typed errors in the Python API (issue 16, item 5), on the tiny llama with a tokenizer and a
chat template: every bad prompt, token-id list or conversation is an InvalidArgumentError that
names the problem and where it is; sampling values that cannot run are rejected or (a tiny
temperature) greedy; logits that cannot be sampled are a GenerationError naming the cause."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import portable_infer  # noqa: E402
from _serving import EngineSpy, add_tokenizer  # noqa: E402
from portable_infer.errors import GenerationError, InvalidArgumentError  # noqa: E402
from portable_infer.model import Model  # noqa: E402
from portable_infer.decode.sampling import SamplingParams, apply_penalties, make_sampler  # noqa: E402
from portable_infer.serving.scheduler import Scheduler, SchedulerConfig  # noqa: E402

SEED = 16016  # fixed: the prompts below are hand-written; this seeds the sampled-logit rows
IDS = [5, 17, 42, 9]


@pytest.fixture(scope="module")
def model(tiny_llama, tmp_path_factory):
    pkg = add_tokenizer(tiny_llama.package, tmp_path_factory.mktemp("api_errors") / "pkg")
    return portable_infer.load(pkg, "cpu", intra_op_threads=2, static_kv=False)


def raises(call, *match: str, param: str | None = None):
    with pytest.raises(InvalidArgumentError) as err:
        call()
    for m in match:
        assert m in str(err.value), f"{m!r} not in {str(err.value)!r}"
    if param is not None:
        assert err.value.param == param, (err.value.param, str(err.value))
    return err.value


# --- prompts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [None, 12, 3.5, {"text": "hi"}, object()])
def test_a_prompt_that_is_neither_text_nor_ids(model, prompt):
    raises(lambda: model.generate(prompt), "must be a str", param="prompt")
    raises(lambda: list(model.stream_generate(prompt)), "must be a str", param="prompt")


def test_lone_surrogates_name_their_position(model):
    raises(lambda: model.generate("ab\ud800cd"), "U+D800 at character 2", "prompt", param="prompt")
    raises(lambda: model.encode("\udfff"), "U+DFFF at character 0")
    raises(lambda: model.batch_generate(["fine", "x\ud83dy"]), "prompts[1]", "U+D83D at character 1")
    raises(lambda: model.chat([{"role": "user", "content": "hi \udc00"}]), "messages[0].content",
           "U+DC00 at character 3", param="messages")
    raises(lambda: model.chat([{"role": "us\ud800er", "content": "hi"}]), "messages[0].role")
    assert model.generate("caf\u00e9 \U0001F600", max_new_tokens=2) is not None  # valid non-ASCII text is fine


def test_bytes_are_not_token_ids(model):
    for call in (model.generate, model.generate_ids, lambda p: model.batch_generate_ids([p])):
        raises(lambda: call(b"hello"), "bytes are not token ids", param="prompt")
    raises(lambda: model.generate_ids(bytearray(b"hi")), "bytes are not token ids")


@pytest.mark.parametrize("ids, says", [
    ([True, False], "prompt[0] is True (a bool)"),
    ([5, np.bool_(True)], "prompt[1] is"),
    ([5, -1], "prompt[1] is -1"),
    ([5, 256], "prompt[1] is 256"),
    ([5, 2.0], "prompt[1] is 2.0 (float)"),
    (np.array([1.0, 2.0]), "integer dtype"),
    (np.array([[1, 2]]), "1-D"),
    (np.array([True, False]), "integer dtype"),
])
def test_bad_token_ids(model, ids, says):
    raises(lambda: model.generate_ids(ids), says, param="prompt")


def test_integer_arrays_ranges_and_tuples_are_token_ids(model):
    want = model.generate_ids(IDS, max_new_tokens=3, ignore_eos=True)
    for ids in (np.array(IDS, np.int32), tuple(IDS), [np.int64(i) for i in IDS]):
        assert model.generate_ids(ids, max_new_tokens=3, ignore_eos=True) == want
    assert len(model.generate_ids(range(3, 9), max_new_tokens=2, ignore_eos=True)) == 2


def test_batch_prompts_must_be_a_non_empty_list(model):
    raises(lambda: model.batch_generate("one prompt"), "list of prompts")
    raises(lambda: model.batch_generate(None), "list of prompts")
    raises(lambda: model.batch_generate_ids([]), "at least one prompt")
    raises(lambda: model.generate_ids("text"), "use generate for text")


# --- conversations -------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, says", [
    ([], "the conversation is empty"),
    ((), "the conversation is empty"),
    ("hello", "must be a list"),
    (None, "must be a list"),
    (["hello"], "messages[0] must be a dict"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([{"content": "hi"}], "messages[0] has no 'role'"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 5}], "messages[1].content must be a str"),
    ([{"role": None, "content": "hi"}], "messages[0].role must be a str"),
])
def test_malformed_conversations(model, messages, says):
    raises(lambda: model.chat(messages), says, param="messages")
    raises(lambda: list(model.stream_chat(messages)), says)


def test_the_scheduler_checks_prompts_the_same_way(model):
    with Scheduler(model, SchedulerConfig(max_batch=2)) as sched:
        raises(lambda: sched.submit(None), "must be a str")
        raises(lambda: sched.submit("a\ud800"), "U+D800")
        raises(lambda: sched.submit_chat([]), "empty")
        raises(lambda: sched.submit_ids([True, 5], model.defaults), "a bool")
        raises(lambda: sched.submit_ids([5, 999], model.defaults), "prompt[1] is 999")
        assert sched.stats().requests_failed == 0


def test_a_command_line_prompt_that_is_not_utf8(model, capsys):
    from portable_infer.cli import main

    # Python decodes argv with surrogateescape: the byte 0xFF arrives as U+DCFF
    code = main(["generate", "--model", str(model.path), "--provider", "cpu", "caf\udcff"])
    err = capsys.readouterr().err
    assert code == 2 and "byte 0xFF" in err and "not UTF-8" in err, err


# --- sampling values and logits ------------------------------------------------------------------
def test_a_tiny_temperature_is_greedy_decoding(model):
    """The rule (SamplingParams' docstring): below 1e-5 a temperature is stored as 0.0 (greedy)."""
    assert SamplingParams(temperature=1e-300).temperature == 0.0
    assert SamplingParams(temperature=9.9e-6).plain_greedy
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    greedy = model.generate_ids(IDS, max_new_tokens=8, ignore_eos=True)
    assert model.generate_ids(IDS, max_new_tokens=8, ignore_eos=True, temperature=1e-300, seed=1) == greedy
    assert model.batch_generate_ids([IDS, IDS[:2]], max_new_tokens=8, ignore_eos=True,
                                    temperature=5e-324)[0] == greedy


@pytest.mark.parametrize("value", [1e-37, 0.001, 101.0, 1e30])
def test_repetition_penalties_outside_their_range(model, value):
    raises(lambda: model.generate_ids(IDS, repetition_penalty=value), "repetition_penalty must be in [0.01, 100]",
           param="repetition_penalty")


def test_the_sampler_names_why_logits_cannot_be_sampled():
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(300).astype(np.float32)
    for params in (SamplingParams(temperature=0.7, top_p=0.9), SamplingParams()):
        sampler = make_sampler(params)
        for value, reason in ((np.nan, "nan_logits"), (np.inf, "inf_logits")):
            bad = x.copy()
            bad[17] = value
            with pytest.raises(GenerationError) as err:
                sampler(bad, rng)
            assert err.value.reason == reason and "finite maximum" not in str(err.value)
        with pytest.raises(GenerationError) as err:
            sampler(np.full(8, -np.inf, np.float32), rng)
        assert err.value.reason == "no_candidates"
    # a value the request chose that overflows these (huge) logits names the parameter
    huge = x * np.float32(1e37)  # finite in float32 (max ~3e37), but not once divided by 0.01
    with pytest.raises(InvalidArgumentError, match="temperature 1e-05 is too small") as err:
        make_sampler(SamplingParams(temperature=1e-5))(huge, rng)
    assert err.value.param == "temperature"
    with pytest.raises(InvalidArgumentError, match="overflows") as err:
        apply_penalties(huge, [int(np.argmax(huge))], [], SamplingParams(repetition_penalty=0.01))
    assert err.value.param == "repetition_penalty"


def test_nan_logits_in_a_greedy_batch_are_an_error_not_a_token(model):
    """The batch's vectorized argmax once returned the NaN's index as a token."""
    def nan_first_row(out):
        out = np.array(out)
        out[0, 3] = np.nan
        return out

    class NanEngine(EngineSpy):
        def forward(self, ids, *args, **kwargs):
            return nan_first_row(self.engine.forward(ids, *args, **kwargs))

    broken = Model(model.manifest, NanEngine(model.engine, lambda *_: None), model.codec, model.path,
                   model.selection)
    with pytest.raises(GenerationError, match="NaN") as err:
        broken.batch_generate_ids([IDS, IDS[:3]], max_new_tokens=4)
    assert err.value.reason == "nan_logits"
