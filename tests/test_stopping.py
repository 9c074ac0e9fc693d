"""StopMatcher: stop strings over chunked text, never leaked."""

from __future__ import annotations

import numpy as np
import pytest

from portable_infer.errors import InvalidArgumentError
from portable_infer.text.stopping import StopMatcher


def run(stops, chunks) -> tuple[str, bool, list[str]]:
    """Feed ``chunks``; return the emitted text, whether a stop hit, and each feed's output."""
    matcher = StopMatcher(stops)
    outputs, hit = [], False
    for chunk in chunks:
        out, hit = matcher.feed(chunk)
        outputs.append(out)
        if hit:
            break
    tail = "" if hit else matcher.flush()
    return "".join(outputs) + tail, hit, outputs


def test_stop_spanning_three_chunks_is_caught_and_never_leaked():
    text, hit, outputs = run(["<|end|>"], ["Hello <|", "en", "d|> ignored"])
    assert hit and text == "Hello "
    assert outputs == ["Hello ", "", ""]
    assert all("<" not in out and "|" not in out for out in outputs)


def test_text_before_stop_in_same_chunk_is_emitted():
    assert run(["STOP"], ["abc STOP def"])[:2] == ("abc ", True)


def test_partial_prefix_that_is_not_a_stop_is_released():
    matcher = StopMatcher(["###"])
    assert matcher.feed("a #") == ("a ", False)
    assert matcher.feed("#") == ("", False)
    assert matcher.feed(" b") == ("## b", False)  # "## " cannot start "###": released at once


def test_held_prefix_released_by_flush():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("line\n") == ("line", False)
    assert matcher.flush() == "\n"
    assert matcher.flush() == ""


def test_multiple_stops_earliest_wins():
    assert run(["world", "lo w"], ["hel", "lo wor", "ld"])[:2] == ("hel", True)
    assert run(["xyz", "o"], ["hello"])[:2] == ("hell", True)


def test_longer_stop_sharing_prefix_with_shorter_one():
    # "ab" is a prefix of "abc": the shorter stop hits as soon as it is complete.
    assert run(["abc", "ab"], ["xa", "b", "c"])[:2] == ("x", True)


def test_after_stop_every_feed_reports_it_and_flush_is_empty():
    matcher = StopMatcher(["!"])
    assert matcher.feed("hi!there") == ("hi", True)
    assert matcher.stopped
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("anything <|") == ("anything <|", False)
    assert matcher.flush() == ""


def test_stop_in_multibyte_text():
    assert run(["。"], ["日本", "語。次"])[:2] == ("日本語", True)


@pytest.mark.parametrize("seed", range(20))
def test_random_chunking_matches_whole_text_search(seed):
    rng = np.random.default_rng(seed)
    alphabet = list("ab#<|> \n")
    text = "".join(rng.choice(alphabet, size=60))
    stops = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 4)))) for _ in range(2)]
    cuts = sorted(set(rng.integers(0, len(text), size=10).tolist()) | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    emitted, hit, _ = run(stops, chunks)
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert hit == bool(found)
    assert emitted == (text[: min(found)] if found else text)  # nothing past a stop, nothing lost


@pytest.mark.parametrize("bad", ["###", [""], [None], ["ok", 3]])
def test_bad_stops_rejected(bad):
    with pytest.raises(InvalidArgumentError, match="stops"):
        StopMatcher(bad)
