"""The only tensor code: prefill, decode, sampling, and a training micro-step's forward and
backward."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from .batch import Batch
from .sequence import Sequence

BASE_ROW = "__base__"  # PEFT's per-row name for "no adapter"


class Runner:
    def __init__(self, model, *, device: torch.device):
        self.model = model  # becomes a PeftModel once the first adapter is added
        self.device = device
        self.config = model.config
        # transformers renamed past_key_values to cache during 5.x
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def forward(self, input_ids, *, mask, position_ids, cache=None, adapters=None, **kwargs):
        """One pass over the layers; `adapters` names each row's adapter (None = base)."""
        if self.peft and adapters is not None:
            kwargs["adapter_names"] = [a or BASE_ROW for a in adapters]
        return self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            **{self.cache_arg: cache},
            **kwargs,
        )

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One pass over the prompts of `seqs`, left-padded to the longest."""
        width = max(s.num_prompt_tokens for s in seqs)
        ids = torch.tensor(
            [[0] * (width - s.num_prompt_tokens) + s.prompt_ids for s in seqs], device=self.device
        )  # [B, P]
        mask = torch.tensor(
            [[0] * (width - s.num_prompt_tokens) + [1] * s.num_prompt_tokens for s in seqs],
            device=self.device,
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config)
        out = self.forward(
            ids,
            mask=mask,
            position_ids=positions,
            cache=cache,
            adapters=[s.pinned for s in seqs],
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, mask, out.logits[:, -1].float()  # [B, V]

    @torch.no_grad()
    def decode(self, batch: Batch) -> torch.Tensor:
        seqs = batch.seqs
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.num_tokens - 1] for s in seqs], device=self.device)
        mask = batch.grow()
        out = self.forward(
            ids,
            mask=mask,
            position_ids=positions,
            cache=batch.cache,
            adapters=[s.pinned for s in seqs],
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()  # [B, V]

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            p = seq.sampling
            if p.greedy and p.repetition_penalty == 1.0:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(seq.prompt_ids + seq.output_ids, device=row.device)
                score = row.gather(0, seen)
                score = torch.where(
                    score < 0, score * p.repetition_penalty, score / p.repetition_penalty
                )
                row = row.scatter(0, seen, score)
            if p.greedy:
                tokens[i] = int(row.argmax())
                continue
            tokens[i] = self._draw(row / p.temperature, seq)
        return tokens

    def _draw(self, row: torch.Tensor, seq: Sequence) -> int:
        p = seq.sampling
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_row, order = torch.sort(row, descending=True)
            probs = sorted_row.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
            row = torch.full_like(row, float("-inf")).scatter(
                0, order, sorted_row.masked_fill(drop, float("-inf"))
            )
        if seq.generator is None:
            seq.generator = torch.Generator(device=row.device)
            if p.seed is None:
                seq.generator.seed()
            else:
                seq.generator.manual_seed(p.seed)
        return int(torch.multinomial(row.softmax(-1), 1, generator=seq.generator))

    def forward_backward(
        self, batch: dict[str, torch.Tensor], *, scale: float
    ) -> tuple[float, int]:
        """Forward and backward one micro-batch on the active (training) adapter.

        The gradient is d(sum of token losses * scale): with scale = 1 / label tokens of the whole
        effective batch, micro-batches of any grouping add up to the same gradient.
        Returns (sum of token losses, label tokens).
        """
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss_sum, n = self._loss_sum(batch)
        (loss_sum * scale).backward()
        return loss_sum.item(), n

    def train_probe(self, rows: int, length: int) -> None:
        """Forward and backward over dummy tokens with the gradient taken only with respect to
        the input embeddings: the work of a LoRA micro-step of rows x length tokens less the
        adapter's own small share. For calibrating the cost model; changes no weights."""
        ids = torch.zeros((rows, length), dtype=torch.long, device=self.device)  # [B, S]
        flags = [p.requires_grad for p in self.model.parameters()]
        self.model.requires_grad_(False)
        try:
            with torch.enable_grad():
                embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_()
                logits = self.model(inputs_embeds=embeds, use_cache=False).logits.float()
                logits.logsumexp(-1).sum().backward()  # as costly as the cross-entropy's
        finally:
            for p, g in zip(self.model.parameters(), flags, strict=True):
                p.requires_grad_(g)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        loss_sum, n = self._loss_sum({k: v.to(self.device) for k, v in batch.items()})
        return loss_sum.item(), n

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # [B, S]
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = out.logits.float()  # [B, S, V]; no copy in fp32
        # position i predicts token i+1: shift the labels, not the (large) logits, so neither
        # the forward nor the backward copies a [B, S-1, V] slice
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # [B, S]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return loss, int((targets != -100).sum())
