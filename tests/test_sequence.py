"""A request's text stream: stop strings, held-back text, finish reasons (no model)."""

from fineinfer_jupyter.engine.config import SamplingParams, Slo
from fineinfer_jupyter.engine.sequence import Sequence


def seq(**sampling) -> Sequence:
    return Sequence([1, 2, 3], sampling=SamplingParams(**sampling), slo=Slo(), max_context=10)


def feed(s: Sequence, texts: list[str], eos_at: int = -1) -> list[str]:
    deltas = []
    for i, text in enumerate(texts):
        s.output_ids.append(i)
        deltas.append(s.update_text(text, eos=i == eos_at))
        if s.finish_reason:
            break
    return deltas


def test_the_start_of_a_stop_string_is_held_back_until_it_resolves():
    s = seq(stop=["END"])
    assert feed(s, ["Hi E", "Hi EN", "Hi ENx", "Hi ENxE", "Hi ENxEND"]) == [
        "Hi ",
        "",
        "ENx",
        "",
        "",
    ]
    assert s.finish_reason == "stop" and s.text == "Hi ENx"


def test_a_stop_string_split_across_tokens_ends_the_text_before_it():
    s = seq(stop=["\n\n", "###"])
    assert "".join(feed(s, ["a", "a#", "a##", "a###tail"])) == "a"
    assert s.finish_reason == "stop"


def test_an_incomplete_character_waits_for_its_next_byte():
    s = seq()
    assert feed(s, ["caf", "caf\ufffd", "café"]) == ["caf", "", "é"]


def test_finish_reasons_eos_length_and_context():
    s = seq(max_new_tokens=5)
    assert feed(s, ["a", "ab"], eos_at=1) == ["a", "b"] and s.finish_reason == "eos"
    s = seq(max_new_tokens=2)
    feed(s, ["a", "ab", "abc"])
    assert s.finish_reason == "length" and s.text == "ab"
    s = seq(max_new_tokens=50)  # 3 prompt tokens, context 10
    feed(s, [str(i) for i in range(20)])
    assert s.finish_reason == "context" and len(s.output_ids) == 7


def test_ignore_eos_keeps_going():
    s = seq(max_new_tokens=3, ignore_eos=True)
    feed(s, ["a", "ab", "abc"], eos_at=0)
    assert s.finish_reason == "length"
