"""Log-probabilities the OpenAI API hands out: of each sampled token (`logprobs`) and of the
prompt's own tokens (`echo`, scoring), with the top alternatives at each position.

Always of the model's own distribution (log-softmax of the raw logits, before temperature,
top-k/top-p or repetition penalty), as vLLM reports them by default. An entry is
(token id, logprob, [(id, logprob), ...] the top alternatives, most likely first).
"""

from __future__ import annotations

import torch

Entry = tuple[int, float | None, list[tuple[int, float]]]


def entries(logits: torch.Tensor, tokens: list[int], k: int) -> list[Entry]:
    """Each row's chosen token's logprob and the top `k` alternatives; logits [N, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1))[:, 0].tolist()
    top = torch.topk(logp, k, dim=-1) if k else None
    out = []
    for i, token in enumerate(tokens):
        alts = list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top else []
        out.append((token, chosen[i], alts))
    return out


def score_prompts(logits: torch.Tensor, seqs, width: int) -> None:
    """Set `prompt_logprobs` of each sequence that asks for them, from a prefill's logits of
    every position ([B, P, V], prompts left-padded to `width`): the logits at position t give
    token t+1's logprob; the first token has none (logprob None, as OpenAI's echo shows it)."""
    for b, seq in enumerate(seqs):
        k = seq.sampling.prompt_logprobs
        if k is None:
            continue
        start = width - seq.num_prompt_tokens
        rows = logits[b, start : width - 1]  # [n - 1, V]: predicts tokens 1 .. n-1
        seq.prompt_logprobs = [(seq.prompt_ids[0], None, []), *entries(rows, seq.prompt_ids[1:], k)]


def record(logits: torch.Tensor, seqs, tokens: list[int]) -> None:
    """Append each sampled token's entry to the sequences that ask for them; logits [B, V]."""
    rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None and not s.score_only]
    for i in rows:
        seq = seqs[i]
        seq.logprobs += entries(logits[i : i + 1], [tokens[i]], seq.sampling.logprobs)


def as_json(items: list[Entry], text) -> list[dict]:
    """Entries with each token's text (`text(id)`), as events carry them."""
    out = []
    for item in items:
        token, logprob, alts = item
        top = [{"id": i, "token": text(i), "logprob": lp} for i, lp in alts]
        out.append({"id": token, "token": text(token), "logprob": logprob, "top": top})
    return out
