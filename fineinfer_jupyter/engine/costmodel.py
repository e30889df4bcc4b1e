"""Running estimates of how long work takes, from what the engine measured: what the
scheduler plans with (docs/design.md, "The cost model").

Each kind of work is a line, seconds = fixed + per_unit * units (units: prompt tokens of a
prefill pass, padded to its longest prompt; rows for a decode; padded tokens (examples x the
longest) for a training micro-step), fitted by least squares over recent samples of every size,
and corrected near sizes already measured. The optimizer step, which only the last micro-step
of an effective batch runs, is estimated on its own.

The machine's speed changes when other programs use it: each line also keeps a speed factor,
the median of how far the last three measurements of about the same size (within 8x) were off
the line, so that estimates follow a slowdown (or its end) within two or three measurements; a
short pass, mostly fixed cost, says little about a long one. The line learns from measurements
divided by that factor (the machine's shape of costs, apart from its speed of the moment).
A training micro-step runs in units (walk.TrainingPass); each unit's share of the micro-step's
time is learned from the units measured.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

PER_BUCKET = 16  # recent samples kept per size bucket (sizes within a factor of ~1.4)
RECENT = 3  # measurements the speed factor is the median of
NEAR = 6  # size buckets (a factor of 8): a speed measured at one size holds within this of it
SHARE_WEIGHT = 0.3  # how much one measured micro-step moves the units' shares
# micro-steps after which a size not measured since stops bending the train line (its size is
# the scheduler's choice: a size its offset made look slow would otherwise never run again)
STALE_STEPS = 8
# a one-row pass with nothing in its KV cache attends causally (SDPA's is_causal kernel); a
# chunk (or a padded group) attends through a mask, with K/V repeated per query group: per
# pair of tokens the mask costs ~1.5x (this CPU, SmolLM2-135M: 1.4x fp32, 1.6x bf16), unless
# the chunk's attention is split (attention.py: no mask over the earlier keys, causal over its
# own: a one pass's cost per pair; `split`)
CAUSAL = 1.5


def prefill_units(
    seqs, span: float = math.inf, end: int | None = None, *, split: bool = False
) -> float:
    """The work of a prefill pass, in tokens: every row's new tokens padded to the longest
    (a chunk or a cache hit computes only the tokens after those already in its KV; `end`: a
    one-row pass up to that prompt position), plus their attention to the tokens before them."""
    past = max(s.prefilled for s in seqs)
    new = end - past if end is not None else max(s.num_todo for s in seqs)
    return len(seqs) * pass_units(new, past, span, causal=len(seqs) == 1, split=split)


def pass_units(
    new: int, past: int, span: float, *, causal: bool = True, split: bool = False
) -> float:
    """A row of `new` tokens after `past` tokens already in the KV cache, in tokens: each new
    token's attention to the earlier ones is counted as tokens' worth, a token attending to
    `span` tokens as one more (attention_span, in a masked pass's pairs); a one pass's causal
    attention to itself (`causal`, nothing in the KV cache) as CAUSAL x fewer, and so a one-row
    chunk's attention where chunks' attention is `split` (attention.py)."""
    if causal and (split or not past):
        return new * (1 + (past + new / 2) / (CAUSAL * span))
    return new * (1 + (past + new / 2) / span)


def attention_span(config) -> float:
    """The context length at which a token's attention (2 x 2 x heads x head_dim FLOPs per
    earlier token and layer: scores and values) costs as much as its matrix products (2 FLOPs per
    weight of its layers), from a model config; inf when the config does not say."""
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    inter = getattr(config, "intermediate_size", None)
    if not (hidden and layers and inter):
        return math.inf
    heads = getattr(config, "num_attention_heads", 1) or 1
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter
    return per_layer / (2 * heads * head_dim)


def measured_span(
    probes: list[tuple[int, int, float]], prior: float, *, split: bool = False
) -> float:
    """attention_span as measured on the loaded model: `probes` are prefill passes (new tokens,
    tokens already in the KV cache, seconds), among them two one-pass probes of different sizes
    and a chunk probe of the larger size after earlier tokens. The chunk's extra time over the
    one-pass probe of the same size is its attention to the earlier tokens (new x past pairs);
    the slope between the two one-pass probes is a token's own cost (less their own causal
    attention, CAUSAL x cheaper per pair; a `split` chunk's attention costs as much per pair
    as theirs, so its extra time is its new x past pairs, CAUSAL x cheaper than the span's
    masked pairs). Their ratio is the span. The FLOP count (`prior`,
    attention_span) does not hold across dtypes (bf16 matrix units speed up the matrix
    products, not attention), and a slope fitted on short prompts alone overstates long ones;
    the prior stays where the probes say nothing (noise), and bounds the result within 8x
    either way (a noisy probe could otherwise make long prompts look far dearer)."""
    once: dict[int, float] = {}
    after: dict[tuple[int, int], float] = {}  # (the least of repeated probes)
    for new, past, seconds in probes:
        if not past:
            once[new] = min(seconds, once.get(new, math.inf))
        else:
            after[new, past] = min(seconds, after.get((new, past), math.inf))
    for (new, past), seconds in after.items():
        smaller = [n for n in once if n < new]
        if new not in once or not smaller:
            continue
        m = max(smaller)
        extra = seconds - once[new]  # its attention to the past, less the once probe's own
        if extra <= 0:
            return prior
        if split:  # (a masked pair's cost, which the span is counted in)
            per_pair = CAUSAL * extra / (new * past)
        else:  # (through the mask)
            per_pair = extra / (new * (past + new * (1 - 1 / CAUSAL) / 2))
        own = per_pair * (new * new - m * m) / (2 * CAUSAL)  # the one-pass probes' attention
        per_token = (once[new] - once[m] - own) / (new - m)
        if per_token <= 0:
            return prior
        span = per_token / per_pair
        return span if math.isinf(prior) else min(max(span, prior / 8), prior * 8)
    return prior


def _bucket(units: float) -> int:
    return round(2 * math.log2(max(units, 1.0)))


class LinearCost:
    def __init__(self, fixed: float, per_unit: float, *, stale: int | None = None):
        self.fixed, self.per_unit = fixed, per_unit  # priors, until measurements come in
        # `stale`: after this many measurements, a size bucket not measured since no longer
        # corrects the line near it, and its old samples go when it is measured again
        self.stale, self.fits, self.fitted = stale, 0, {}  # (fitted: bucket -> its last fit)
        # samples are kept per size bucket, so that sizes seen a while ago still pin the line
        # down when recent steps all have about the same size (a narrow range of sizes alone
        # cannot tell the fixed cost from the per-unit one)
        self.buckets: dict[int, deque[tuple[float, float]]] = {}
        # (units, measured / estimated) of the latest measurements: the speed factor's
        self.ratios: deque[tuple[float, float]] = deque(maxlen=8 * RECENT)

    @property
    def samples(self) -> list[tuple[float, float]]:
        return [xy for b in self.buckets.values() for xy in b]

    def line(self, units: float) -> float:
        return self.fixed + self.per_unit * units

    def __call__(self, units: float) -> float:
        return self.base(units) * self.factor_at(units)

    @property
    def factor(self) -> float:
        """The speed factor of the latest measurements, whatever their size (status)."""
        return statistics.median(r for _, r in list(self.ratios)[-RECENT:]) if self.ratios else 1.0

    def factor_at(self, units: float) -> float:
        """The machine's speed now against the line, for work of this size: the median of the
        last RECENT measurements within a factor of 8 of it. With none that near, that of the
        latest measurements whose per-unit work outweighs their fixed cost (a short pass is
        mostly fixed cost: Python, thread wake-ups, a LoRA's per-layer overhead while a job
        trains, which a long pass pays once), else 1 (the line as measured)."""
        b = _bucket(units)
        near = [r for u, r in self.ratios if abs(_bucket(u) - b) <= NEAR]
        if not near and units * self.per_unit > self.fixed:
            near = [r for u, r in self.ratios if u * self.per_unit > self.fixed]
        return statistics.median(near[-RECENT:]) if near else 1.0

    def base(self, units: float) -> float:
        """The line, corrected by how far the work measured at about this size was off it
        (times are not quite linear: large steps can be slower per unit on a CPU)."""
        near = () if self._stale(_bucket(units)) else self.buckets.get(_bucket(units), ())
        off = statistics.median(y - self.line(x) for x, y in near) if len(near) >= 2 else 0.0
        return max(0.0, self.line(units) + off)

    def _stale(self, bucket: int) -> bool:
        return self.stale is not None and self.fits - self.fitted.get(bucket, 0) >= self.stale

    def follow(self, units: float, seconds: float, estimate: float) -> None:
        """A measurement of work of `units` against its estimate (without the factor): the
        factor follows, once the line rests on measurements rather than on its prior."""
        if estimate > 0 and seconds > 0 and len(self.samples) >= RECENT:
            self.ratios.append((units, seconds / estimate))

    def observe(self, units: float, seconds: float) -> None:
        """The factor follows; the line learns the measurement at the speed it now assumes."""
        self.follow(units, seconds, self.base(units))
        self._fit(units, seconds / self.factor_at(units))

    def _fit(self, units: float, seconds: float) -> None:
        b = _bucket(units)
        if self._stale(b):
            self.buckets.pop(b, None)  # measured again after a while: what it says now
        self.fits += 1
        self.fitted[b] = self.fits
        bucket = self.buckets.setdefault(b, deque(maxlen=PER_BUCKET))
        bucket.append((float(units), seconds))
        # each size bucket weighs the same, however many samples it holds: many passes of one
        # size (a long prompt's chunks) must not tilt the line longer ones are estimated from
        # (a stale bucket no longer tilts it either)
        points = [
            (x, y, 1 / len(q)) for k, q in self.buckets.items() if not self._stale(k) for x, y in q
        ]
        w = sum(p for _, _, p in points)
        mx = sum(x * p for x, _, p in points) / w
        my = sum(y * p for _, y, p in points) / w
        var = sum(p * (x - mx) ** 2 for x, _, p in points) / w
        if len(points) >= 3 and var > (0.1 * mx) ** 2:  # sizes spread enough to fit a line
            slope = sum(p * (x - mx) * (y - my) for x, y, p in points) / (var * w)
            if slope > 0:
                self.per_unit, self.fixed = slope, max(0.0, my - slope * mx)
                return
        # about one size seen so far: keep the prior's split between fixed and per-unit cost
        guess = self.fixed + self.per_unit * mx
        scale = my / guess if guess > 0 else 1.0
        self.fixed, self.per_unit = self.fixed * scale, self.per_unit * scale


class CostModel:
    def __init__(self, *, gpu: bool = False):
        f = 0.02 if gpu else 1.0  # priors: this CPU (docs/design.md), a GPU ~50x faster
        self.prefill = LinearCost(0.02 * f, 0.0045 * f)  # per prompt token
        self.decode = LinearCost(0.07 * f, 0.0045 * f)  # per row
        # per padded token of a micro-step (whose size the scheduler picks from this line)
        self.train = LinearCost(0.05 * f, 0.0093 * f, stale=STALE_STEPS)
        self.optimizer = 0.0  # seconds of an optimizer step, added to a batch's last micro-step
        self.margin = 1.15  # plan with estimates padded against noise
        self.span = math.inf  # a prefill's attention cost (prefill_units; set from the model)
        self.split = False  # chunks' attention split (attention.py; set from the model)
        self.shares = [1.0]  # each unit's share of a micro-step's time (set_units)
        self._units: list[float] = []  # seconds of the units of the micro-step being measured
        self._padded = 0
        # layer offload: fetching a layer's weights (per byte), which layers are off the device
        self.fetch = LinearCost(0.0005 * f, 2e-10 * f)
        self.offloaded: frozenset[int] = frozenset()
        self.layer_bytes = 0
        self.num_layers = 0

    def set_units(self, weights: list[float]) -> None:
        """A micro-step's units and their relative costs, before any is measured."""
        total = sum(weights)
        self.shares = [w / total for w in weights]

    def set_offload(self, layers: list[int], layer_bytes: int, num_layers: int) -> None:
        self.offloaded, self.layer_bytes = frozenset(layers), layer_bytes
        self.num_layers = num_layers

    def unit_layer(self, u: int) -> int | None:
        """The decoder layer unit u runs (a micro-step's units: each layer's forward, the head,
        the head's backward, each layer's backward in reverse), None for the head's."""
        n = self.num_layers
        if u < n:
            return u
        back = len(self.shares) - 1 - u
        return back if back < n else None

    def unit(self, padded: int, u: int, *, shared: bool = False) -> float:
        """Estimated seconds of unit u of a micro-step of `padded` tokens: its compute, and the
        fetch of its layer if that is offloaded and no inference pass shares the fetch."""
        seconds = self.train(padded) * self.shares[u]
        if not shared and self.unit_layer(u) in self.offloaded:
            seconds += self.fetch(self.layer_bytes)
        return seconds

    def observe_units(self, padded: int, first: int, seconds: list[float]) -> None:
        """Units first, first + 1, ... of a micro-step ran in `seconds`: the train line's factor
        follows at once; once the micro-step's every unit is in, the line learns its total and
        the shares move towards what was measured."""
        if not seconds:
            return
        share = sum(self.shares[first : first + len(seconds)])
        self.train.follow(padded, sum(seconds), self.train.base(padded) * share)
        if first == 0:
            self._units, self._padded = [], padded
        if first != len(self._units) or padded != self._padded:
            self._units = []  # not the micro-step being measured: start over with the next
            return
        self._units += seconds
        if len(self._units) == len(self.shares):
            total = sum(self._units)
            self.train._fit(padded, total / self.train.factor_at(padded))
            measured = [t / total for t in self._units]
            self.shares = [
                (1 - SHARE_WEIGHT) * old + SHARE_WEIGHT * new
                for old, new in zip(self.shares, measured, strict=True)
            ]
            self._units = []

    def observe(self, kind: str, units: float, seconds: float) -> None:
        if kind == "optimizer":  # a running mean that follows changes
            self.optimizer = seconds if not self.optimizer else 0.8 * self.optimizer + 0.2 * seconds
            return
        getattr(self, kind).observe(units, seconds)
        if kind == "prefill" and not self.train.samples:
            # until a training step is measured: forward + backward ~ 3x a forward per token
            self.train.fixed, self.train.per_unit = (
                3 * self.prefill.fixed,
                3 * self.prefill.per_unit,
            )

    def calibrate_prefill(self, probes: list[tuple[int, int, float]]) -> None:
        """Prefill probes measured at load (new tokens, past tokens, seconds): the attention
        span from them (measured_span, the config's FLOP count as the prior), then the line."""
        self.span = measured_span(probes, self.span, split=self.split)
        largest = max(new for new, _, _ in probes)
        for new, past, seconds in probes:  # (one measurement at a time, no speed factor yet)
            if 4 * new >= largest:  # the line is for long prompts: shorter passes, which a
                # CPU runs at a higher cost per token, would tilt it (they come back as
                # measurements of real passes, near whose sizes they correct the line)
                self.prefill._fit(pass_units(new, past, self.span, split=self.split), seconds)

    def snapshot(self) -> dict:
        return {
            **{
                k: {"fixed": c.fixed, "per_unit": c.per_unit, "factor": c.factor}
                for k, c in (
                    ("prefill", self.prefill),
                    ("decode", self.decode),
                    ("train", self.train),
                    ("fetch", self.fetch),
                )
            },
            "optimizer": self.optimizer,
            "attention_span": self.span,
        }
