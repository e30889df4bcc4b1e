"""A request's text stream: incremental detokenizing, stop strings, held-back text, finish
reasons (no model)."""

from fineinfer_jupyter.engine.config import SamplingParams, Slo
from fineinfer_jupyter.engine.sequence import MAX_PENDING, Detokenizer, Sequence


class ByteTokenizer:
    """One token per byte; bytes that are not (yet) a character decode as U+FFFD."""

    def __init__(self):
        self.calls: list[int] = []  # how many ids each decode call saw

    def decode(self, ids):
        self.calls.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


class WordTokenizer:
    """SentencePiece-like: every piece carries its leading space, and a decoded text never
    starts with one (so a window decoded alone loses the space of its first piece)."""

    PIECES = ["▁Hello", "▁world", ",", "▁again", "!"]

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids).replace("▁", " ").removeprefix(" ")


def detokenize(tokenizer, ids) -> list[str]:
    d, out = Detokenizer(tokenizer), []
    for n in range(1, len(ids) + 1):
        out.append(d(ids[:n]))
    return out


def seq(**sampling) -> Sequence:
    return Sequence([1, 2, 3], sampling=SamplingParams(**sampling), slo=Slo(), max_context=10)


def feed(s: Sequence, texts: list[str], eos_at: int = -1) -> list[str]:
    deltas, before = [], ""
    for i, text in enumerate(texts):
        s.output_ids.append(i)
        deltas.append(s.update_text(text[len(before) :], eos=i == eos_at))
        before = text
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
    assert detokenize(ByteTokenizer(), list("café!".encode())) == ["c", "a", "f", "", "é", "!"]


def test_pieces_decoded_a_window_at_a_time_keep_their_spaces():
    ids = [0, 1, 2, 3, 4]
    assert "".join(detokenize(WordTokenizer(), ids)) == WordTokenizer().decode(ids)
    assert detokenize(WordTokenizer(), ids) == ["Hello", " world", ",", " again", "!"]


def test_each_token_decodes_a_short_window_however_long_the_answer():
    tok = ByteTokenizer()
    text = "Moonveil thistle grows on north-facing scree, ~2,000 m. " * 40  # 2,240 bytes
    out = detokenize(tok, list(text.encode()))
    assert "".join(out) == text
    assert max(tok.calls) <= 2 * MAX_PENDING  # not the whole answer: flat cost per token


def test_bytes_that_never_form_a_character_are_streamed_after_a_bounded_wait():
    ids = [0xFF] * (MAX_PENDING + 3) + list(b"ok")
    text = "".join(detokenize(ByteTokenizer(), ids))
    assert text.endswith("ok") and text.count("\ufffd") == MAX_PENDING + 3


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
