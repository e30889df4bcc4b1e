"""Running estimates of step times, from the steps the engine measured: what the scheduler plans with.

Each step kind is a line, seconds = fixed + per_unit * units (units: prompt tokens for prefill,
rows for decode, tokens for a training micro-step), fitted by least squares over recent steps.
"""

from __future__ import annotations

from collections import deque

WINDOW = 64


class LinearCost:
    def __init__(self, fixed: float, per_unit: float):
        self.fixed, self.per_unit = fixed, per_unit  # priors, until measurements come in
        self.samples: deque[tuple[float, float]] = deque(maxlen=WINDOW)

    def __call__(self, units: float) -> float:
        return max(0.0, self.fixed + self.per_unit * units)

    def observe(self, units: float, seconds: float) -> None:
        self.samples.append((float(units), seconds))
        n = len(self.samples)
        xs = [x for x, _ in self.samples]
        ys = [y for _, y in self.samples]
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        if n >= 3 and var > 1e-9:
            slope = sum((x - mx) * (y - my) for x, y in self.samples) / var
            if slope > 0:
                self.per_unit, self.fixed = slope, max(0.0, my - slope * mx)
                return
        # one size seen so far: keep the prior's split between fixed and per-unit cost
        guess = self.fixed + self.per_unit * mx
        scale = my / guess if guess > 0 else 1.0
        self.fixed, self.per_unit = self.fixed * scale, self.per_unit * scale


class CostModel:
    def __init__(self, *, gpu: bool = False):
        f = 0.02 if gpu else 1.0  # priors: this CPU (DESIGN.md), a GPU ~50x faster
        self.prefill = LinearCost(0.02 * f, 0.0045 * f)  # per prompt token
        self.decode = LinearCost(0.07 * f, 0.0045 * f)  # per row
        self.train = LinearCost(0.05 * f, 0.0093 * f)  # per token of the micro-batch
        self.margin = 1.15  # plan with estimates padded against noise

    def observe(self, kind: str, units: float, seconds: float) -> None:
        getattr(self, kind).observe(units, seconds)
        if kind == "prefill" and not self.train.samples:
            # until a training step is measured: forward + backward ~ 3x a forward per token
            self.train.fixed, self.train.per_unit = (
                3 * self.prefill.fixed,
                3 * self.prefill.per_unit,
            )

    def snapshot(self) -> dict:
        return {
            k: {"fixed": c.fixed, "per_unit": c.per_unit}
            for k, c in (("prefill", self.prefill), ("decode", self.decode), ("train", self.train))
        }
