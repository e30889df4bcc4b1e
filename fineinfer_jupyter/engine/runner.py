"""The tensor code of inference and training: prefill, decode, sampling, and a training
micro-step's forward and backward; walk.py has the pass over the layers they share."""

from __future__ import annotations

import inspect
import time

import torch
from transformers import DynamicCache

from . import logprobs
from .batch import Batch
from .config import SamplingParams, Slo
from .precision import RowLinear, autocast_dtype, decoding, fewer_threads, interleaved_seconds
from .quant import logical_numel
from .sequence import Sequence
from .walk import BASE_ROW, LayerWalk, TrainingPass, token_loss


class Runner:
    def __init__(self, model, *, device: torch.device):
        self.walk = LayerWalk(model)
        self.device = device
        self.config = model.config
        # transformers renamed past_key_values to cache during 5.x
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.autocast = autocast_dtype(model)  # training forwards of a bf16 base (precision.py)
        self.rows = any(isinstance(m, RowLinear) for m in model.modules())  # a bf16 base on a CPU
        self.one_thread_upto = 0  # tokens: prefill passes up to this size on one thread
        self.prefill_seconds: dict = {}  # choose_prefill_threads': {tokens: {1: s, None: s}}
        self.row_threads: dict = {}  # choose_row_threads': its verdict and seconds, for status

    @property
    def model(self):
        """The PeftModel once the first adapter is added (the plain model before)."""
        return self.walk.model

    @model.setter
    def model(self, model) -> None:
        self.walk.model = model

    @property
    def peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def forward(
        self,
        input_ids,
        *,
        mask,
        position_ids,
        cache=None,
        adapters=None,
        keep: int = 0,
        kind: str = "decode",
        also=None,
    ) -> torch.Tensor:
        """One pass over the layers, the runner's own walk where the model allows it; returns
        the logits (of the last `keep` positions, or all). `adapters` names each row's adapter
        (None = base); `also(i)` runs while layer i is there (LayerWalk.layers)."""
        w = self.walk
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device) + past
            position_ids = position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)
        if not w.supported:
            kwargs = (
                {"adapter_names": [a or BASE_ROW for a in adapters]}
                if self.peft and adapters
                else {}
            )
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                **{self.cache_arg: cache},
                use_cache=cache is not None,
                logits_to_keep=keep,
                **kwargs,
            )
            return out.logits
        hidden = w.embed(input_ids)
        p = w.begin(hidden, mask=mask, position_ids=position_ids, cache=cache, adapters=adapters)
        hidden = w.layers(p, hidden, 0, w.num_layers, kind=kind, also=also)
        return w.head(p, hidden, keep)

    @torch.no_grad()
    def prefill(
        self,
        seqs: list[Sequence],
        also=None,
        *,
        cache: DynamicCache | None = None,
        end: int | None = None,
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One pass over prompt tokens, left-padded to the longest row: each row's tokens from
        `seq.prefilled` (0, or those already in `cache`: a chunked prefill's earlier chunks, or
        a prefix-cache hit) to `end` (the whole prompt by default). With earlier tokens, the
        pass has one row and extends `cache`. Returns the cache, the mask of its columns and
        the logits of each row's last position. A request that asks for its prompt's logprobs
        is prefilled whole in one pass (the scheduler and the prefix cache see to it)."""
        start = [s.prefilled for s in seqs]
        if len(seqs) > 1 and (any(start) or end is not None):
            raise ValueError("a pass after cached tokens, or of part of a prompt, has one row")
        if any(start) and cache is None:
            raise ValueError("tokens already prefilled but no KV cache given")
        rows = [s.prompt_ids[p : end or s.num_prompt_tokens] for s, p in zip(seqs, start)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=self.device)
        new = torch.tensor(
            [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device
        )  # [B, S]
        past = torch.ones((len(rows), start[0]), dtype=new.dtype, device=new.device)
        mask = torch.cat([past, new], 1)  # [B, P + S]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        cache = cache if cache is not None else DynamicCache(config=self.config)
        scoring = any(s.sampling.prompt_logprobs is not None for s in seqs)
        if scoring and (any(start) or end is not None):
            raise ValueError("prompt logprobs need the whole prompt in one pass")
        # (a pass after earlier tokens, a chunk or a prefix-cache hit, attends to them: its
        # attention gains from every thread, whatever its own length)
        short = also is None and not start[0] and len(rows) * width <= self.one_thread_upto
        with fewer_threads(1 if short else None):  # (choose_prefill_threads)
            logits = self.forward(
                ids,
                mask=mask,
                position_ids=positions,
                cache=cache,
                adapters=[s.pinned for s in seqs],
                keep=0 if scoring else 1,  # every position's logits for the prompt's logprobs
                kind="prefill",
                also=also,
            )
        if scoring:
            logprobs.score_prompts(logits, seqs, width)
        return cache, mask, logits[:, -1].float()  # [B, V]

    @torch.no_grad()
    def decode(self, batch: Batch, also=None) -> torch.Tensor:
        seqs = batch.seqs
        ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.num_tokens - 1] for s in seqs], device=self.device)
        mask = batch.grow()
        # one row of a bf16 model: one thread (precision.py; not with a training unit in
        # between, which keeps every thread)
        one = self.rows and len(seqs) == 1
        # (and its products, of one row or of a few, by int8 (int4) copies where int8rows.py
        # made them and measured them faster for that many rows: RowLinear.copy_rows)
        with fewer_threads(1 if one and also is None else None), decoding(self.rows):
            logits = self.forward(
                ids,
                mask=mask,
                position_ids=positions,
                cache=batch.cache,
                adapters=[s.pinned for s in seqs],
                keep=1,
                also=also,
            )
        return logits[:, -1].float()  # [B, V]

    def choose_prefill_threads(
        self, sizes: tuple[int, ...] = (256, 1024), margin: float = 0.05
    ) -> None:
        """A bf16 model on a CPU (RowLinear layers): time prefill passes of each of `sizes`
        tokens (smallest first) on one thread and on the count (best of 2 each, after a
        warm-up), and from now on prefill passes up to the largest size where one thread was
        `margin` faster, and every smaller size was too, on one thread (`one_thread_upto`).
        Their parallel regions are short, and waking the other threads for each can cost
        more than they give (docs/benchmarks.md, "bf16 on the CPU's matrix units"); a long
        pass's products are long enough to gain from every thread (a 4,103-token prompt on
        one thread took 1.5x its two-thread time), and so are float32's. Before the cost
        model's probes, so they measure the passes as they will run."""
        text = self.config.get_text_config()
        most = (getattr(text, "max_position_embeddings", None) or 1024) // 4
        self.one_thread_upto = 0
        if not self.rows or torch.get_num_threads() == 1:
            return
        for tokens in sorted({min(n, most) for n in sizes if n > 0}):
            seq = Sequence([0] * tokens, sampling=SamplingParams(max_new_tokens=1), slo=Slo())
            # (each size is above one_thread_upto, the sizes already won: prefill itself
            # keeps the count this block gives it)
            self.prefill([seq])  # warm-up
            seconds = {}
            for n in (1, None, 1, None):
                with fewer_threads(n):
                    start = time.perf_counter()
                    self.prefill([seq])
                    seconds[n] = min(seconds.get(n, float("inf")), time.perf_counter() - start)
            self.prefill_seconds[tokens] = seconds
            if seconds[1] * (1 + margin) >= seconds[None]:
                return  # the count wins here: and at every larger size
            self.one_thread_upto = tokens

    def choose_row_threads(
        self, batch: Batch, repeats: int = 5, margin: float = 0.03
    ) -> list[float]:
        """A bf16 model on a CPU (RowLinear layers): time one-row decode passes of `batch` (one
        sequence) with the layers' one-row products on one thread and on every thread (the rest
        of the pass on one thread either way: `decode`), best of `repeats` each, interleaved,
        after a warm-up of each; every product runs on every thread from now on
        (`RowLinear.spread`) if that was `margin` faster. The verdict is a machine's: on a Xeon
        with AMX waking the other thread for each of a pass's ~200 small products cost more
        than it gave; on a Zen 4 a decode at batch 1 ran 1.07-1.23x (int8 copies) and
        1.14-1.39x (bf16 mv) faster on two, and as fast beside a busy neighbour
        (docs/benchmarks.md, "The Zen 4's ceiling, W8A8 tried, one-row products on every
        thread"). Each pass extends the batch's cache by a token (a calibration probe's).
        Returns the seconds of the timed passes made the chosen way ([] if none were timed):
        calibration's decode timings, so that start-up runs no more passes than this."""
        layers = [m for m in self.model.modules() if isinstance(m, RowLinear)]
        threads = torch.get_num_threads()
        for m in layers:
            m.spread = False
        if not layers or threads == 1 or len(batch.seqs) != 1:
            return []

        def spread(on: bool) -> None:
            for m in layers:
                m.spread = on

        taken = interleaved_seconds(
            (False, True), spread, lambda: self.decode(batch), repeats, clock=time.perf_counter
        )
        seconds = {spread: min(t[1:]) for spread, t in taken.items()}  # (each one's first: warm-up)
        chosen = seconds[True] * (1 + margin) < seconds[False]
        for m in layers:
            m.spread = chosen
        self.row_threads = {
            "threads": threads if chosen else 1,
            "reason": (
                f"a one-row pass took {seconds[False] * 1e3:.1f} ms with its layers' products "
                f"on one thread, {seconds[True] * 1e3:.1f} ms on {threads} (at start)"
            ),
            "seconds": {"one": seconds[False], "all": seconds[True]},
        }
        return taken[chosen][1:]

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
        logprobs.record(logits, seqs, tokens)
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

    def micro_step(
        self, batch: dict[str, torch.Tensor], *, scale: float, own_grads: bool = False
    ) -> TrainingPass:
        """A micro-step's forward and backward on the active (training) adapter, to run a few
        units at a time (TrainingPass.run); `own_grads`: its gradients reach the weights' .grad
        only at its add_grads().

        The gradient is d(sum of token losses * scale): with scale = 1 / label tokens of the whole
        effective batch, micro-batches of any grouping add up to the same gradient.
        """
        batch = {k: v.to(self.device) for k, v in batch.items()}
        walk = self.walk if self.walk.supported else None
        return TrainingPass(
            walk, self.model, batch, scale=scale, autocast=self.autocast, own_grads=own_grads
        )

    def forward_backward(
        self, batch: dict[str, torch.Tensor], *, scale: float
    ) -> tuple[float, int]:
        """A whole micro-step at once. Returns (sum of token losses, label tokens)."""
        run = self.micro_step(batch, scale=scale)
        run.run(run.units)
        return run.loss_sum, run.labels

    def unit_weights(self) -> list[float]:
        """The relative cost of each unit of a micro-step (TrainingPass), before any is measured:
        a layer's forward is 1, the head's is its size in layers, a backward twice its forward."""
        if not self.walk.supported:
            return [1.0, 2.0]
        off, stack = self.walk.offload, self.walk.stack
        # (an offloaded layer's parameters are empty between fetches: its record has the count;
        # a 4-bit layer's are packed: counted unpacked)
        layer = (
            off.numel[0]
            if off is not None
            else sum(logical_numel(p) for p in stack.layers[0].parameters())
        )
        head = sum(p.numel() for p in self.walk.causal_lm.lm_head.parameters()) / max(layer, 1)
        forward = [1.0] * self.walk.num_layers + [max(head, 0.1)]
        return forward + [2 * w for w in reversed(forward)]

    def train_probe(self, rows: int, length: int) -> None:
        """Forward and backward over dummy tokens with the gradient taken only with respect to
        the input embeddings: the work of a LoRA micro-step of rows x length tokens less the
        adapter's own small share. For calibrating the cost model; changes no weights."""
        ids = torch.zeros((rows, length), dtype=torch.long, device=self.device)  # [B, S]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        flags = [p.requires_grad for p in self.model.parameters()]
        self.model.requires_grad_(False)
        try:
            if self.walk.supported:
                run = TrainingPass(
                    self.walk, self.model, batch, scale=1.0, probe=True, autocast=self.autocast
                )
                run.run(run.units)
                return
            with torch.enable_grad():
                embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_()
                logits = self.model(inputs_embeds=embeds, use_cache=False).logits.float()
                logits.logsumexp(-1).sum().backward()  # as costly as the cross-entropy's
        finally:
            for p, g in zip(self.model.parameters(), flags, strict=True):
                p.requires_grad_(g)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor], adapters=None) -> tuple[float, int]:
        """(sum of token losses, label tokens), no gradients; `adapters` per row as in forward
        (None: the active adapter, the one training)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        logits = self.forward(
            batch["input_ids"],
            mask=batch["attention_mask"],
            position_ids=None,
            adapters=adapters,
            kind="train",
        )
        loss, n = token_loss(logits, batch["labels"])
        return loss.item(), n
