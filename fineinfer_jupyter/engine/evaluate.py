"""Did the adapter learn? Loss and perplexity on held-out examples and, for question/answer
data, how often greedy answers match the reference: an adapter and the models it is compared
with, side by side (docs/design.md, "Evaluation").

Scoring runs in the engine thread one pass of EVAL_BATCH examples per call (Engine._call): the
engine iterates between two calls, so a request waits at most one such pass, as it would for
a prefill. Answers are ordinary greedy requests, scheduled with everyone else's.
"""

from __future__ import annotations

import math

from .data import IGNORE, Example, collate

EVAL_BATCH = 4  # examples per scoring pass
EXTRA_TOKENS = 8  # an answer may run this far past the reference's length before it is cut
SHOWN_ROWS = 3  # example rows in the result


def normalize(text: str) -> str:
    """For exact match: case and runs of whitespace do not count, nor a final . ! or ?"""
    return " ".join(text.casefold().split()).rstrip(".!?").strip()


def matches(answer: str, reference: str) -> tuple[bool, bool]:
    """(exact match, contains) of a generated answer against the reference."""
    a, r = normalize(answer), normalize(reference)
    return a == r, bool(r) and r in a


def score_pass(core, name: str | None, examples: list[Example]) -> tuple[float, int]:
    """Engine thread: (sum of token losses, label tokens) of `examples` on adapter `name`
    (None: the base model), a no-grad forward; a training adapter is scored at a snapshot."""
    pinned = core.adapters.pin(name)
    try:
        batch = collate(examples, core.trainer.pad_id)
        return core.runner.eval_loss(batch, adapters=[pinned] * len(examples))
    finally:
        core.adapters.unpin(pinned)


def answer_budget(example: Example, cap: int) -> int:
    """max_new_tokens for an answer: the label tokens of the example (the reference and its
    end-of-turn tokens) plus EXTRA_TOKENS, at most `cap`."""
    labels = sum(1 for t in example.labels[1:] if t != IGNORE)
    return max(1, min(cap, labels + EXTRA_TOKENS))


def summary(name: str, loss: tuple[float, int], answers: list[str], refs: list[str]) -> dict:
    total, tokens = loss
    mean = total / tokens if tokens else None
    checked = [matches(a, r) for a, r in zip(answers, refs)]
    return {
        "model": name,
        "loss": mean,
        "perplexity": math.exp(mean) if mean is not None and mean < 700 else None,
        "label_tokens": tokens,
        "answers": len(checked),
        "exact_match": sum(e for e, _ in checked) / len(checked) if checked else None,
        "contains": sum(c for _, c in checked) / len(checked) if checked else None,
    }


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
