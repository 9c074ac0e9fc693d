"""The decode loop (BatchDecoder) and Model's text layers against a fake engine: no ONNX at all.

The fake engine returns scripted logits and checks the loop's bookkeeping on every call: the
mask covers past + new tokens, the batch matches the cache, and (when given a capacity) the
cache never grows past the context. Text tests use a real byte-level BPE tokenizer trained here
on a few strings, with a vocabulary small enough that emoji and CJK characters span tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from portable_infer.package import manifest as mf
from portable_infer.errors import ContextLengthError, InvalidArgumentError
from portable_infer.decode.generate import BatchDecoder
from portable_infer.model import Model
from portable_infer.decode.sampling import SamplingParams
from portable_infer.text.codec import TextCodec

VOCAB = 32


# --- the fake engine ----------------------------------------------------------------------------
class FakeCache:
    def __init__(self, batch: int):
        self.batch = batch
        self.length = 0
        self.prefill = 0  # width of the prefill call

    def nbytes(self) -> int:
        return 0


class FakeEngine:
    """Engine.forward's contract with scripted logits.

    ``rule(row, step, last_fed_token) -> logits [vocab]``; ``step`` is 0 for the logits of the
    prefill, k after the k-th decode forward.
    """

    provider = "FakeExecutionProvider"
    greedy_on_device = False  # the loop reads both off every engine (Engine protocol)
    masks_on_device = False
    samples_on_device = False
    variant = SimpleNamespace(name="fake")

    def __init__(self, rule, vocab: int = VOCAB, capacity: int | None = None):
        self.rule = rule
        self.vocab = vocab
        self.capacity = capacity
        self.fed: list[np.ndarray] = []  # ids of every forward call
        self.masks: list[np.ndarray] = []

    @property
    def calls(self) -> int:
        return len(self.fed)

    def new_cache(self, batch: int, capacity: int | None = None) -> FakeCache:
        return FakeCache(batch)

    def trim(self, dropped_bytes: int) -> None:
        pass

    def forward(self, ids, mask, cache, all_logits=False):
        b, s = ids.shape
        assert b == cache.batch, f"batch {b} fed to a cache of batch {cache.batch}"
        assert mask.shape == (b, cache.length + s), f"mask {mask.shape} for past {cache.length} + {s} new"
        if self.capacity is not None:
            assert cache.length + s <= self.capacity, f"cache grows to {cache.length + s} > {self.capacity}"
        if cache.length == 0:
            cache.prefill = s
        cache.length += s
        self.fed.append(np.array(ids))
        self.masks.append(np.array(mask))
        step = cache.length - cache.prefill
        logits = np.stack([np.asarray(self.rule(r, step, int(ids[r, -1])), np.float32) for r in range(b)])
        assert not all_logits, "the loop only needs last-position logits"
        return logits


def one_hot(token: int, vocab: int = VOCAB) -> np.ndarray:
    x = np.zeros(vocab, np.float32)
    x[token] = 10.0
    return x


def successor(row: int, step: int, last: int) -> np.ndarray:
    """Greedy continues last+1, last+2, ... (mod vocab)."""
    return one_hot((last + 1) % VOCAB)


def scripted(scripts: list, eos: int, vocab: int):
    """Row r emits scripts[r][0], scripts[r][1], ... then eos forever."""
    def rule(row: int, step: int, last: int) -> np.ndarray:
        script = scripts[row]
        return one_hot(script[step] if step < len(script) else eos, vocab)
    return rule


def decoder(engine, prompts, *, eos=(), max_context=64, truncate=False, **sampling) -> BatchDecoder:
    params = SamplingParams(**sampling)
    return BatchDecoder(engine, prompts, [params] * len(prompts), eos_ids=eos, max_context=max_context,
                        pad_id=0, truncate=truncate)


def reasons(dec: BatchDecoder) -> list:
    return [r.finish_reason for r in dec.rows]


# --- stopping -----------------------------------------------------------------------------------
def test_max_new_tokens_stops_with_length_and_no_wasted_forward():
    engine = FakeEngine(successor)
    dec = decoder(engine, [[3]], max_new_tokens=5)
    assert dec.run() == [[4, 5, 6, 7, 8]]
    assert reasons(dec) == ["length"]
    assert engine.calls == 1 + 4  # prefill + one per fed token; the 5th token is never fed


def test_eos_stops_with_stop_and_is_the_last_token():
    dec = decoder(FakeEngine(successor), [[3]], eos=(7,), max_new_tokens=20)
    assert dec.run() == [[4, 5, 6, 7]]
    assert reasons(dec) == ["stop"]


def test_ignore_eos_runs_to_max_new_tokens():
    dec = decoder(FakeEngine(successor), [[3]], eos=(7,), max_new_tokens=8, ignore_eos=True)
    assert dec.run() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert reasons(dec) == ["length"]


def test_stop_token_ids_stop_like_eos_even_with_ignore_eos():
    dec = decoder(FakeEngine(successor), [[3]], eos=(20,), stop_token_ids=[6], max_new_tokens=20,
                  ignore_eos=True)
    assert dec.run() == [[4, 5, 6]]
    assert reasons(dec) == ["stop"]


@pytest.mark.parametrize("prompt_len", [1, 3, 7])
def test_full_context_finishes_with_length(prompt_len):
    max_context = 8
    engine = FakeEngine(successor, capacity=max_context)  # asserts the cache never overflows
    dec = decoder(engine, [list(range(1, prompt_len + 1))], max_context=max_context, max_new_tokens=100)
    (out,) = dec.run()
    assert reasons(dec) == ["length"]
    assert prompt_len + len(out) == max_context, "the context must be used up, not more"
    assert out == list(range(prompt_len + 1, max_context + 1))


@pytest.mark.parametrize("prompt_len", [8, 12])
def test_prompt_not_fitting_the_context_raises(prompt_len):
    engine = FakeEngine(successor)
    with pytest.raises(ContextLengthError, match="truncate=True") as err:
        decoder(engine, [list(range(1, prompt_len + 1))], max_context=8)
    assert f"{prompt_len} tokens" in str(err.value) and "8" in str(err.value)
    assert engine.calls == 0


def test_truncate_keeps_the_last_tokens():
    engine = FakeEngine(successor, capacity=8)
    dec = decoder(engine, [list(range(1, 13))], max_context=8, truncate=True, max_new_tokens=3)
    assert engine.fed[0].tolist() == [[6, 7, 8, 9, 10, 11, 12]]  # the last max_context - 1 tokens
    assert dec.run() == [[13]]  # one slot left in the context
    assert reasons(dec) == ["length"]


def test_empty_prompt_raises():
    with pytest.raises(InvalidArgumentError, match="empty"):
        decoder(FakeEngine(successor), [[]])
    with pytest.raises(InvalidArgumentError, match="empty"):
        decoder(FakeEngine(successor), [[1, 2], []])


def test_no_prompts_raises():
    with pytest.raises(InvalidArgumentError, match="at least one prompt"):
        BatchDecoder(FakeEngine(successor), [], [], max_context=8)


# --- sampling seeds -----------------------------------------------------------------------------
FLAT = np.random.default_rng(7).normal(0.0, 0.3, VOCAB).astype(np.float32)  # every token likely


def sampled(seed: int, n: int = 24) -> list:
    dec = decoder(FakeEngine(lambda row, step, last: FLAT), [[1, 2]], temperature=1.0, seed=seed,
                  max_new_tokens=n)
    return dec.run()[0]


def test_same_seed_same_sequence():
    assert sampled(0) == sampled(0)
    assert sampled(12345) == sampled(12345)


def test_different_seeds_differ():
    runs = {tuple(sampled(seed)) for seed in range(4)}
    assert len(runs) == 4, "24 draws over a flat 32-token distribution should differ between seeds"
    assert len(set(sampled(0))) > 5, "temperature 1 on flat logits must not behave like greedy"


def test_batch_rows_with_the_same_seed_sample_like_single_runs():
    rule = lambda row, step, last: FLAT  # noqa: E731
    dec = decoder(FakeEngine(rule), [[1, 2], [3]], temperature=1.0, seed=3, max_new_tokens=10)
    single = decoder(FakeEngine(rule), [[1, 2]], temperature=1.0, seed=3, max_new_tokens=10).run()[0]
    assert dec.run() == [single, single]  # each row has its own generator seeded alike


# --- finishing from outside and per row ---------------------------------------------------------
def test_finish_stops_without_another_forward():
    engine = FakeEngine(successor)
    dec = decoder(engine, [[3]], max_new_tokens=50)
    (ev,) = dec.step()
    assert (ev.token, ev.finish_reason) == (4, None)
    dec.finish(0, "stop")
    assert dec.done and reasons(dec) == ["stop"]
    assert dec.step() == [] and dec.run() == [[4]]
    assert engine.calls == 1, "a sequence stopped between steps must not cost a forward pass"


def test_finish_keeps_the_first_reason():
    dec = decoder(FakeEngine(successor), [[3]], max_new_tokens=1)
    dec.run()
    dec.finish(0, "stop")
    assert reasons(dec) == ["length"]


def test_batch_rows_finish_independently():
    engine = FakeEngine(successor)
    dec = decoder(engine, [[1], [5, 6], [8]], eos=(10,), max_new_tokens=20)
    seen = {0: [], 1: [], 2: []}
    while not dec.done:
        for ev in dec.step():
            assert dec.rows[ev.row].finish_reason == ev.finish_reason
            assert not seen[ev.row] or seen[ev.row][-1][1] is None, f"row {ev.row} emitted after finishing"
            seen[ev.row].append((ev.token, ev.finish_reason))
    assert dec.run() == [list(range(2, 11)), [7, 8, 9, 10], [9, 10]]
    assert reasons(dec) == ["stop"] * 3
    assert engine.calls == 9  # prefill + 8 decode steps: the longest row's 9 tokens, the last unfed


def test_batch_prefill_is_left_padded():
    engine = FakeEngine(successor)
    decoder(engine, [[4, 5, 6], [9]], max_new_tokens=2).run()
    assert engine.fed[0].tolist() == [[4, 5, 6], [0, 0, 9]]
    assert engine.masks[0].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert engine.masks[1].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_finishing_one_row_leaves_the_others_running():
    engine = FakeEngine(successor)
    dec = decoder(engine, [[1], [11]], max_new_tokens=6)
    dec.step()
    dec.step()
    dec.finish(1)
    assert not dec.done
    out = dec.run()
    assert out == [[2, 3, 4, 5, 6, 7], [12, 13]]
    assert reasons(dec) == ["length", "stop"]
    assert engine.calls == 6


def test_batch_equals_single_runs():
    prompts = [[1, 2, 3], [20], [5, 9]]
    batch = decoder(FakeEngine(successor), prompts, eos=(25,), max_new_tokens=12).run()
    single = [decoder(FakeEngine(successor), [p], eos=(25,), max_new_tokens=12).run()[0] for p in prompts]
    assert batch == single


# --- through Model: text, stop strings, streaming -------------------------------------------------
EOS = "<|endoftext|>"
EMOJI = "😀🎉👍🏽"
CJK = "日本語のテキスト、中文文本"
CORPUS = [f"Hello world! {EMOJI} emoji party", CJK, "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # A small vocabulary: multi-byte characters are split over several byte-level tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOS], show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def fake_manifest(vocab: int, eos: int, max_context: int = 256) -> mf.Manifest:
    kv = mf.KVLayout(layout="BHSD", dtype="float32", num_kv_heads=1, head_dim=4, growth="concat", past=(),
                     present=())
    variant = mf.GraphVariant(name="fake", file="fake.onnx", precision="fp32", opset=21, domains=(),
                              providers=("*",), inputs=(), outputs=(), kv=kv)
    dims = mf.ModelDims(architecture="llama", model_type="llama", num_layers=1, num_heads=1, num_kv_heads=1,
                        head_dim=4, hidden_size=4, intermediate_size=4, vocab_size=vocab, max_context=max_context)
    return mf.Manifest(schema_version=mf.SCHEMA_VERSION, exporter_version="test", source={}, model=dims,
                       precision="fp32", variants=(variant,),
                       tokenizer=mf.TokenizerInfo(eos_token_ids=(eos,), pad_token_id=0),
                       generation=mf.GenerationDefaults())


def scripted_model(tokenizer, texts: list) -> tuple[Model, FakeEngine]:
    """A Model whose row r generates ``texts[r]`` (tokenized) then EOS."""
    eos = tokenizer.token_to_id(EOS)
    vocab = tokenizer.get_vocab_size()
    scripts = [tokenizer.encode(t).ids for t in texts]
    engine = FakeEngine(scripted(scripts, eos, vocab), vocab=vocab)
    manifest = fake_manifest(vocab, eos)
    return Model(manifest, engine, TextCodec.from_manifest(manifest, tokenizer)), engine


def streamed(model: Model, **kw) -> list:
    return list(model.stream_generate([1], max_new_tokens=kw.pop("max_new_tokens", 200), **kw))


def check_prefixes(pieces: list, final: str) -> None:
    """Every running concatenation is a prefix of the final text: nothing emitted is taken back."""
    text = ""
    for p in pieces:
        text += p
        assert final.startswith(text), f"emitted {text!r}, which is not a prefix of {final!r}"
    assert text == final


def test_model_streams_until_eos(tokenizer):
    text = "Hello world! emoji party"
    model, _ = scripted_model(tokenizer, [text])
    rs = streamed(model)
    assert "".join(r.text for r in rs) == text
    assert [r.finish_reason for r in rs[:-1]] == [None] * (len(rs) - 1) and rs[-1].finish_reason == "stop"
    assert rs[-1].token == tokenizer.token_to_id(EOS) and rs[-1].generation_tokens == len(rs)
    assert model.generate([1]) == text


@pytest.mark.parametrize("text", [f"Hi {EMOJI} and {CJK}!", "👍🏽🎉😀", f"{CJK}{EMOJI}{CJK}"])
def test_streamed_pieces_are_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the test needs tokens that split a character"
    model, _ = scripted_model(tokenizer, [text])
    pieces = [r.text for r in streamed(model)]
    for p in pieces:
        assert "\ufffd" not in p, f"a broken character was streamed: {pieces}"
        p.encode("utf-8")  # no lone surrogates either
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert sum(1 for p in pieces if p) < len(ids), "characters spanning tokens must be emitted together"


@pytest.mark.parametrize("text, stop, expected", [
    ("The answer is 42.### ignored", ["###"], "The answer is 42."),
    ("The quick brown fox jumps over the lazy dog. More", ["lazy dog"], "The quick brown fox jumps over the "),
    ("a # b ## c ###d", ["###"], "a # b ## c "),  # partial matches are held back, then released
    (f"party {EMOJI} after", ["🎉"], "party 😀"),  # a stop string made of split bytes
    ("Hello world! The end", ["nothing", "world!", "Hello"], ""),  # the earliest match wins
])
def test_stop_strings_cut_the_text_and_never_leak(tokenizer, text, stop, expected):
    model, engine = scripted_model(tokenizer, [text])
    rs = streamed(model, stop=stop)
    check_prefixes([r.text for r in rs], expected)
    assert rs[-1].finish_reason == "stop"
    n_tokens = len(tokenizer.encode(text).ids)
    assert len(rs) < n_tokens, "generation must stop at the stop string, not run to EOS"
    assert engine.calls == len(rs), "no forward pass after the stop string matched"
    assert model.generate([1], stop=stop) == expected


def test_multi_token_stop_string(tokenizer):
    stop = "lazy dog"
    assert len(tokenizer.encode(stop).ids) > 1
    model, _ = scripted_model(tokenizer, ["the lazy cat, the lazy dog, the end"])
    assert model.generate([1], stop=[stop]) == "the lazy cat, the "


def test_held_back_partial_stop_is_released_at_the_length_limit(tokenizer):
    text = "abc #"
    n = len(tokenizer.encode(text).ids)
    model, _ = scripted_model(tokenizer, [text])
    rs = streamed(model, stop=["##"], max_new_tokens=n)
    assert "".join(r.text for r in rs) == text
    assert rs[-1].finish_reason == "length"


def test_batch_generate_applies_stop_strings_per_row(tokenizer):
    texts = ["one ### two", "Hello world! ###", f"{EMOJI} no stop here"]
    model, _ = scripted_model(tokenizer, texts)
    assert model.batch_generate([[1], [1, 2], [3]], stop=["###"]) == ["one ", "Hello world! ", f"{EMOJI} no stop here"]


def test_batch_generate_rejects_a_single_string(tokenizer):
    model, _ = scripted_model(tokenizer, ["x"])
    with pytest.raises(InvalidArgumentError, match="list of prompts"):
        model.batch_generate("hello")


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature must be >= 0, got -1"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -2}, "top_k must be an int >= 0, got -2"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
    ({"topp": 0.5}, "unknown sampling parameter(s): topp"),
])
def test_bad_sampling_values_through_generate(tokenizer, kwargs, message):
    model, engine = scripted_model(tokenizer, ["x"])
    with pytest.raises(InvalidArgumentError) as err:
        model.generate("Hello", **kwargs)
    assert message in str(err.value)
    with pytest.raises(InvalidArgumentError):
        model.batch_generate(["Hello", "Hi"], **kwargs)
    assert engine.calls == 0, "parameters are checked before any forward pass"
