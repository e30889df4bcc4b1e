"""dtype "auto" on a CPU: bfloat16 where the CPU has bf16 matrix units and a short probe at load
measures bf16 faster, else float32 (docs/design.md, "Base weight formats").

oneDNN runs bf16 matmuls on AMX tiles or AVX512-BF16 dot products; without them (AVX2-only
CPUs) bf16 is emulated and slower than fp32. The probe times a linear layer of the model's shape
(hidden size -> MLP width, from its config, before the weights load) on a prefill-sized block
of rows in both dtypes: a 64-wide test model or a CPU whose bf16 path is slow stays float32.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 matrix units
MIN_HIDDEN = 256  # narrower models: per-op overheads, not matmuls, set the pace
MIN_GAIN = 1.2  # bf16 must be this much faster on the probe to be chosen
PROBE_ROWS = 128


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 matrix-unit flags (empty: none, or not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return [f for f in BF16_FLAGS if f in flags]


def widths(config) -> tuple[int, int]:
    """(hidden size, MLP width) of a transformers config: the probe's matmul shape."""
    text = config.get_text_config()
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    return hidden, int(getattr(text, "intermediate_size", 0) or 4 * hidden)


def measure(out_features: int, in_features: int, rows: int = PROBE_ROWS, repeats: int = 5):
    """Seconds of one forward of `rows` rows through an (out x in) linear layer in float32 and
    in bfloat16 (the best of `repeats`, after a warm-up): (fp32, bf16)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    times = []
    for dt in (torch.float32, torch.bfloat16):
        wd, xd = w.to(dt), x.to(dt)
        with torch.inference_mode():
            torch.nn.functional.linear(xd, wd)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                torch.nn.functional.linear(xd, wd)
                best = min(best, time.perf_counter() - t)
        times.append(best)
    return times[0], times[1]


def auto_cpu_dtype(
    config,
    *,
    units: Callable[[], list[str]] | None = None,
    probe: Callable[[int, int], tuple[float, float]] | None = None,
) -> tuple[torch.dtype, str]:
    """(dtype, why) for dtype "auto" on a CPU, decided from the model's config before its
    weights load (units, probe: this module's, or a test's)."""
    units, probe = units or cpu_bf16_units, probe or measure
    flags = units()
    if not flags:
        return (
            torch.float32,
            "auto: float32 (this CPU has no bf16 matrix units: no amx_bf16 or avx512_bf16)",
        )
    hidden, inner = widths(config)
    if hidden < MIN_HIDDEN:
        return (
            torch.float32,
            f"auto: float32 (hidden size {hidden} < {MIN_HIDDEN}: bf16 units do not pay)",
        )
    fp32, bf16 = probe(inner, hidden)
    gain = fp32 / max(bf16, 1e-9)
    has = ", ".join(flags)
    if gain < MIN_GAIN:
        return (
            torch.float32,
            f"auto: float32 (CPU has {has}, but bf16 measured only {gain:.2f}x fp32's speed at load)",
        )
    return (
        torch.bfloat16,
        f"auto: bfloat16 (CPU has {has}; a {PROBE_ROWS}-row {hidden}x{inner} matmul measured {gain:.1f}x faster at load)",
    )


# several rows (more than this) multiply by a blocked copy in counts padded to a multiple of it:
# oneDNN builds (JIT-compiles) a kernel for each new count of rows (and thread count), ~3 ms
# a layer shape, ~12 ms for the default model's four at 500 rows, whose products take ~2 ms
# once built: every new prompt length paid it (docs/design.md, "Base weight formats")
ROW_BUCKET = 32
ROW_PARALLEL_MIN = 1 << 22  # weights this large (elements) have a one-row product on all threads
INT4_GROUP = (
    32  # int4 copies (int8rows.py): a scale and a zero point per this many weights of a row
)
# (smaller ones too where calibration measured that faster: RowLinear.spread)


def interleaved_seconds(
    settings: tuple,
    apply: Callable[[object], None],
    run: Callable[[], object],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[object, list[float]]:
    """Seconds `run()` takes after `apply(setting)` (outside the timing), for each of
    `settings` in turn, `repeats` + 1 rounds: {setting: its seconds in order}. Each setting's
    first is its warm-up, which the caller drops. How calibration compares two ways of doing
    the same pass on a noisy machine (Runner.choose_row_threads, int8rows.copy_rows)."""
    taken: dict[object, list[float]] = {s: [] for s in settings}
    for setting in settings * (repeats + 1):
        apply(setting)
        start = clock()
        run()
        taken[setting].append(clock() - start)
    return taken


class RowLinear(torch.nn.Linear):
    """nn.Linear whose one-row inference forward is a matrix-vector product (torch.mv).

    In bf16 on a CPU, F.linear on a single row (a decode at batch 1) takes oneDNN's matmul
    path, ~1.8x slower than fp32's; torch.mv's bf16 kernel is as fast as fp32's linear, on half
    the bytes (docs/benchmarks.md, "bf16 on the CPU's matrix units"). That kernel opens a
    parallel region for every product whatever its size (one dot product per row, grain 1):
    each wakes the sleeping OpenMP workers, which costs more than a layer's product saves (far
    more when a neighbour holds a core), so a weight under ROW_PARALLEL_MIN elements multiplies
    on the calling thread alone; a larger one (a head over a big vocabulary) uses every
    thread. Inside a decode pass (`decoding`) one row multiplies by the weight's int8 (int4)
    copy where int8rows.py made one, and so do up to `copy_rows` rows (measured at load). A small weight's one-row product runs on every thread
    all the same where `spread` is set (Runner.choose_row_threads measured a one-row pass
    faster so). More rows multiply by the weight's oneDNN-blocked copy
    where `prepack` made one, else (and an input that records gradients) by F.linear as
    before. The module stays an
    nn.Linear (PEFT wraps it, state_dict and offload see the same parameters)."""

    spread: bool = False  # its one-row product on every thread, however small (calibration)
    # a decode pass of up to this many rows multiplies by the copies below (int8rows.copy_rows
    # measures it at load; one row: only a decode at batch 1)
    copy_rows: int = 1

    packed: torch.Tensor | None = None  # oneDNN's blocked copy of the weight (prepack)
    packed_from: int = 0  # the data_ptr of the weight it was made from
    int8: tuple[torch.Tensor, torch.Tensor] | None = None  # (int8 weight, scales): int8rows.py
    int8_from: int = 0  # the data_ptr of the weight they were made from
    # (packed int4 weight, bf16 scales and zero points): int8rows.py, decode_weights="int4"
    int4: tuple[torch.Tensor, torch.Tensor] | None = None
    int4_from: int = 0

    def __getstate__(self) -> dict:  # a copy (deepcopy, pickle) multiplies by F.linear
        copies = ("packed", "packed_from", "int8", "int8_from", "int4", "int4_from")
        return {k: v for k, v in self.__dict__.items() if k not in copies}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        if rows == 1:
            int8, int4 = self._copies(x)
            y = row_product(self.weight, self.bias, x, int8, int4=int4, spread=self.spread)
            return y.view(*x.shape[:-1], self.out_features)
        if 0 < rows <= self.copy_rows:  # a decode pass of a few rows: by the copies too
            int8, int4 = self._copies(x)
            if int8 is not None or int4 is not None:
                y = copy_product(x.reshape(rows, self.in_features), int8, int4)
                y = y if self.bias is None else y + self.bias
                return y.view(*x.shape[:-1], self.out_features)
        if self.packed is not None and self.weight.data_ptr() == self.packed_from:
            return self._by_packed(x)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def _copies(self, x: torch.Tensor) -> tuple:
        """(int8 copy, int4 copy) a decode pass's product by this layer multiplies by (one of
        them, or neither): none outside a `decoding` block, for a non-bf16 input (the copies'
        scales are bf16), or where the weight moved since they were made."""
        if not (_decoding.on and x.dtype == torch.bfloat16):
            return None, None
        at = self.weight.data_ptr()
        if self.int4 is not None and at == self.int4_from:
            return None, self.int4
        if self.int8 is not None and at == self.int8_from:
            return self.int8, None
        return None, None

    def _by_packed(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows times the blocked copy, their count padded up to a multiple of ROW_BUCKET
        (zero rows, dropped after): oneDNN builds a kernel for every new count of rows."""
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        pad = -rows % ROW_BUCKET if rows > ROW_BUCKET else 0
        if pad:
            flat = torch.nn.functional.pad(flat, (0, 0, 0, pad))
        y = torch.ops.mkldnn._linear_pointwise(
            flat.contiguous(), self.packed, self.bias, "none", [], ""
        )
        return (y[:rows] if pad else y).view(*x.shape[:-1], self.out_features)


def row_product(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    int8: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    int4: tuple[torch.Tensor, torch.Tensor] | None = None,
    spread: bool = False,
) -> torch.Tensor:
    """weight @ x + bias for one row x, by torch.mv, or with `int8` (an int8 copy of the weight
    and its per-row scales, int8rows.py) by torch's int8 weight-only kernel, or with `int4` (a
    packed int4 copy, its scales and zero points per INT4_GROUP) by its int4 one: on one
    thread for a weight under ROW_PARALLEL_MIN unless `spread`, else on every thread (the count
    outside a `fewer_threads` block)."""
    threads = torch.get_num_threads()
    wide = spread or weight.numel() >= ROW_PARALLEL_MIN
    want = (_pass.threads or threads) if wide else 1
    if want != threads:
        torch.set_num_threads(want)  # (~0.3 us a change)
    try:
        if int4 is not None or int8 is not None:
            y = copy_product(x.reshape(1, -1), int8, int4).view(-1)
        else:
            y = torch.mv(weight, x.reshape(-1))
    finally:
        if want != threads:
            torch.set_num_threads(threads)
    return y if bias is None else y + bias


def copy_product(
    x: torch.Tensor,
    int8: tuple[torch.Tensor, torch.Tensor] | None,
    int4: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """x's rows ([rows, in], bf16) times a weight's int4 copy (its packed codes, its scales and
    zero points per INT4_GROUP) if given, else its int8 copy (int8 weight, per-row scales), by
    torch's weight-only kernels (int8rows.py): [rows, out], no bias."""
    if int4 is not None:
        return torch._weight_int4pack_mm_for_cpu(x, int4[0], INT4_GROUP, int4[1])
    return torch._weight_int8pack_mm(x, int8[0], int8[1])


class _Switch(threading.local):
    """A per-thread switch, off until a `_switched` block in that thread turns it on."""

    on = False


@contextmanager
def _switched(switch: _Switch, on: bool = True) -> Iterator[None]:
    before, switch.on = switch.on, on
    try:
        yield
    finally:
        switch.on = before


_decoding = _Switch()  # this thread runs a decode pass (`decoding`)


def decoding(on: bool = True):
    """The block is a decode pass on this thread: its RowLinear products of one row, and of up
    to each layer's `copy_rows` rows, use their int8 (int4) copies where int8rows.py made them
    (Runner.decode). Prefill, evaluation and training forwards, and other threads, keep the
    bf16 weight."""
    return _switched(_decoding, on)


class _Pass(threading.local):
    threads: int | None = None  # the count outside the fewer_threads block this thread runs


_pass = _Pass()  # (per thread: torch's thread count is, too)


@contextmanager
def fewer_threads(n: int | None) -> Iterator[None]:
    """The block on n threads where n is below the count (None: the count as it is), except a
    RowLinear product of ROW_PARALLEL_MIN or more inside it (a head over a big vocabulary),
    which uses the count. For a bf16 model's inference passes on a CPU, whose parallel regions
    are too short to pay for waking the other threads: a one-row pass (Runner.decode), and a
    prefill where calibration measured one thread faster (Runner.choose_prefill_threads;
    docs/benchmarks.md, "bf16 on the CPU's matrix units")."""
    threads = torch.get_num_threads()
    if n is None or n >= threads or _pass.threads is not None:
        yield
        return
    torch.set_num_threads(n)
    _pass.threads = threads
    try:
        yield
    finally:
        _pass.threads = None
        torch.set_num_threads(threads)


def single_rows_by_mv(model: torch.nn.Module) -> int:
    """Make the model's plain linear layers RowLinear, in place (a bf16 model on a CPU)."""
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = RowLinear
            n += 1
    return n


PACK_SHARE = 0.25  # prepack only while the copies take at most this share of available memory


def prepack(model: torch.nn.Module, available: int | None = None) -> str:
    """Give each RowLinear a copy of its weight in oneDNN's blocked layout for its matrix
    units, for no-grad forwards of more than one row (prefill, decodes of several rows,
    evaluation): F.linear reorders the plain weight at every call; the blocked copy took 8% off
    a 512-token bf16 prefill and 23% off a decode step at batch 8, with the same logits
    (docs/benchmarks.md, "bf16 on the CPU's matrix units"). The copies cost the layers' weight
    bytes again, so only when they fit in PACK_SHARE of the memory available (`available`
    bytes; psutil's reading by default). A layer whose weight has moved since (a new tensor)
    multiplies by F.linear again. Returns what it did, for the load's log."""
    layers = [m for m in model.modules() if isinstance(m, RowLinear)]
    size = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    if not layers or size > PACK_SHARE * available:
        return f"not prepacked ({size / 2**20:.0f} MiB of copies > {PACK_SHARE:.0%} of available memory)"
    try:
        for m in layers:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach())
            m.packed_from = m.weight.data_ptr()
    except (RuntimeError, AttributeError) as e:  # a torch without oneDNN's bf16 linear
        for m in layers:
            m.packed = None
        return f"not prepacked ({e})"
    return f"prepacked {len(layers)} linear layers ({size / 2**20:.0f} MiB)"


def prepacked_bytes(model: torch.nn.Module) -> int:
    """Bytes of the blocked copies `prepack` made: memory beyond the base's weights, which
    status reports beside them (`model.prepacked_bytes`)."""
    return sum(
        m.packed.numel() * m.packed.element_size()
        for m in model.modules()
        if isinstance(m, RowLinear) and m.packed is not None
    )


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype a training forward autocasts to: bfloat16 for a plain (not quantized) bf16
    base, else None (fp32 computes as stored; a quantized base's LoRA layers cast for
    themselves)."""
    dtypes = {p.dtype for p in model.parameters()}
    return torch.bfloat16 if torch.bfloat16 in dtypes and dtypes <= FLOATS else None


FLOATS = {torch.bfloat16, torch.float32}


_upcasting = _Switch()  # this thread is inside attention_in_fp32


def _sdpa_upcast(inner: Callable) -> Callable:
    """transformers' sdpa attention function `inner`, computed in float32 for a bf16 (or fp16)
    CPU forward that records gradients inside `attention_in_fp32` (in that thread): torch's CPU
    flash-attention backward in bf16 took 5-7x its float32 time (docs/benchmarks.md, "bf16 on
    the CPU's matrix units", round 3), more than all of a bf16 layer's matrix products; and for
    a no-grad forward of one query position (a decode pass), whose bf16 flash kernel took 2.5x
    its float32 time with the casts at 64 keys and 4-6x from 256 (docs/benchmarks.md, "A
    decode's attention in float32"). The output is cast back to the input's dtype. Anything
    else (a prefill: no gain measured) passes through unchanged."""

    def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        low = query.dtype in (torch.bfloat16, torch.float16) and query.device.type == "cpu"
        grad = torch.is_grad_enabled()
        if not (low and ((_upcasting.on and grad) or (query.shape[2] == 1 and not grad))):
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):  # (autocast would cast them down again)
            out, weights = inner(
                module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs
            )
        return out.to(query.dtype), weights

    sdpa.upcasts = True
    sdpa.inner = inner  # (lean.one_query_sdpa computes the same for a decode step)
    return sdpa


@contextmanager
def attention_in_fp32() -> Iterator[None]:
    """transformers' "sdpa" attention computes in float32 for forwards that record gradients
    on a CPU, in this thread, for the block (`_sdpa_upcast`). The wrapper goes into
    transformers' local mapping once and stays (a local override leaves its global mapping
    alone): the block only switches it on for its own thread, so that a forward in another
    thread (inference on the engine thread beside the training worker) never sees the table
    change under it; no-grad forwards are not the block's business (one query position: float32
    in every thread, `_sdpa_upcast`; more: unchanged)."""
    upcast_attention()
    with _switched(_upcasting):
        yield


def upcast_attention() -> None:
    """Put `_sdpa_upcast` into transformers' attention table (once; it stays): at the load of a
    bf16 model on a CPU (its decode passes' attention), and at a training forward's first
    `attention_in_fp32` block."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    if not getattr(fns["sdpa"], "upcasts", False):
        fns["sdpa"] = _sdpa_upcast(fns["sdpa"])


class ThreadFlag:
    """A flag that is `default` except in the threads inside a block that flipped it: a LoRA
    layer's `cast_input_dtype_enabled` during a bf16 training forward (`mixed`: CAST_INPUT,
    true, off in the block), or its `_disable_adapters` during an inference pass whose every row
    is on the base model (`walk.LayerWalk.rows`: BASE_ONLY, false, on in the block), which must
    not change how a forward in another thread (the engine thread, the training worker)
    computes the same layer. PEFT reads them as plain attributes."""

    def __init__(self, default: bool = True):
        self.default = default
        self._local = threading.local()

    def __bool__(self) -> bool:
        return self.default != getattr(self._local, "flipped", False)

    def __deepcopy__(self, memo) -> ThreadFlag:
        return self  # (a copied layer shares it)

    def __reduce__(self):
        return _thread_flag, (self.default,)

    @contextmanager
    def flipped(self) -> Iterator[None]:
        self._local.flipped = True
        try:
            yield
        finally:
            self._local.flipped = False

    def off(self):
        """(CAST_INPUT's block)"""
        return self.flipped()


CAST_INPUT = ThreadFlag()  # every LoRA layer's cast_input_dtype_enabled, once `mixed` ran
BASE_ONLY = ThreadFlag(default=False)  # every LoRA layer's _disable_adapters, once rows() ran


def _thread_flag(default: bool) -> ThreadFlag:
    return CAST_INPUT if default else BASE_ONLY


@contextmanager
def mixed(dtype: torch.dtype | None, device: torch.device, layers: list) -> Iterator[None]:
    """A training forward of a bf16 base with float32 LoRA weights, computed in bf16: autocast
    casts each LoRA weight to bf16 for its matmul (its gradient flows back to the float32
    weight), and the LoRA layers `layers` stop casting their bf16 input up to float32 (PEFT's
    `cast_input_dtype_enabled`, here a flag that is off in this thread only: CAST_INPUT), which
    would only be cast down again. Without it each LoRA layer computes in float32: an fp32 copy
    of its input, fp32 products, an fp32 sum with the base's output and a cast back, forward and
    backward (docs/design.md, "Base weight formats"). autocast and grad mode are per thread too;
    attention_in_fp32 changes nothing for a no-grad forward in another thread."""
    if dtype is None:
        yield
        return
    for m in layers:
        if m.cast_input_dtype_enabled is not CAST_INPUT:
            m.cast_input_dtype_enabled = CAST_INPUT
    with CAST_INPUT.off(), torch.autocast(device.type, dtype=dtype), attention_in_fp32():
        yield
