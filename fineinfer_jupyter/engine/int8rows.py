"""Int8 weight-only copies of a bf16 base's linear weights for decode passes on a CPU (one row,
and a few where measured faster; EngineConfig.decode_weights; docs/design.md, "Base weight
formats").

A decode at batch 1 multiplies one row by every weight: torch's bf16 `mv` computes a float32
dot product per output row and is compute-bound, while its int8 weight-only kernel
(`torch._weight_int8pack_mm`: int8 weights, one bf16 scale per output row, bf16 activations)
reads half the bytes and ran 1.4-1.5x faster on one thread (docs/benchmarks.md, "bf16 on the
CPU's matrix units"). At two rows it about ties oneDNN's blocked bf16 product and loses from
four: a decode pass of several rows uses the copies only up to the count measured faster at
load (`copy_rows`: on the Zen 4 two rows for the int8 copies, four, once eight, for the int4
ones). The copies sit beside the bf16 weight as plain attributes of
each `precision.RowLinear` (not parameters: state_dict, PEFT, adapters and export never see
them); prefill, evaluation and training use the bf16 weight as before.

decode_weights="int4" (asked for; "auto" never picks it) makes int4 copies instead (torch's
`_weight_int4pack_mm_for_cpu`: a scale and a zero point per 32 weights of a row): cache-hot
they are no faster than the int8 copies, but in a real decode step the weights stream from
memory, where a quarter of bf16's bytes decoded 1.3-1.45x faster than the int8 copies
(docs/benchmarks.md, "Int4 copies for one-row decodes"), at a larger error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .config import DECODE_WEIGHTS as MODES
from .precision import (
    INT4_GROUP,
    MIN_HIDDEN,
    PACK_SHARE,
    RowLinear,
    decoding,
    interleaved_seconds,
)

MIN_GAIN = 1.05  # "auto": a shape's int8 product must be this much faster than mv at load
# (and copy_rows: the copies' products of several rows, than the blocked bf16 copy's)
ROWS_TRIED = (2, 4, 8)  # decode passes of this many rows may multiply by the copies too
SAMPLE_BYTES = 256 << 20  # copy_rows times the first layers up to this many bytes of bf16 weights
K_MULTIPLE = 16  # the kernel reads each row in blocks of 16: other widths gave garbage or crashed
TOLERANCE = 0.02  # of the largest output: the probe's check of the kernel against its reference


def kernel() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def takes(layer: torch.nn.Linear) -> bool:
    """The kernel takes this layer's shape (its input width a multiple of K_MULTIPLE)."""
    return layer.in_features % K_MULTIPLE == 0 and layer.weight.dtype == torch.bfloat16


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bf16 scales): symmetric per output row, scale = the row's largest |w| / 127
    rounded to bf16 first, so int8 x scale is exactly what the kernel multiplies by."""
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny)
    scales = scales.to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def dequantized(int8: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The float32 weight the kernel multiplies by: the reference its products are checked
    against."""
    q, scales = int8
    return q.float() * scales.float()[:, None]


def measure(
    weight: torch.Tensor, int8: tuple[torch.Tensor, torch.Tensor], repeats: int = 5
) -> tuple[float, float, float]:
    """(seconds of a one-row bf16 mv by `weight`, seconds of the int8 kernel's product by its
    copy `int8`, the product's largest error over its largest output against the dequantized
    reference), on one thread, for a random row: the best of `repeats` interleaved rounds of
    process time, each of at least ~4M weights' work."""
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(weight.dtype)
    reps = max(2, (1 << 22) // weight.numel())
    with _one_thread(), torch.inference_mode():
        ref = x.float() @ dequantized(int8).T
        got = torch._weight_int8pack_mm(x, *int8).float()
        error = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
        best = [float("inf"), float("inf")]
        for _ in range(repeats):
            for i, f in enumerate(
                (lambda: torch.mv(weight, x[0]), lambda: torch._weight_int8pack_mm(x, *int8))
            ):
                f()
                t = time.process_time()
                for _ in range(reps):
                    f()
                best[i] = min(best[i], (time.process_time() - t) / reps)
    return best[0], best[1], error


def kernel4() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu"
    )


def takes4(layer: torch.nn.Linear) -> bool:
    """The int4 kernel takes this layer's shape: its input width a multiple of INT4_GROUP, its
    output width of 16 (the packing's block; others are refused)."""
    return (
        layer.in_features % INT4_GROUP == 0
        and layer.out_features % 16 == 0
        and layer.weight.dtype == torch.bfloat16
    )


def quantize4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int4 codes as int32 [out, in], bf16 scales, bf16 zero points [out, in / INT4_GROUP]):
    asymmetric per group of INT4_GROUP weights of a row, w ~ (q - 8) x scale + zero with q in
    0..15 (the kernel's convention), scale and zero rounded to bf16 first so that this is
    exactly what the kernel multiplies by."""
    w = weight.detach().float()
    groups = w.view(w.shape[0], -1, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8)
    return q.clamp(0, 15).to(torch.int32).view_as(w), scales, zeros


def pack4(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """quantize4's parts as the int4 kernel reads them: (packed weight, [groups, out, 2])."""
    q, scales, zeros = parts
    return (
        torch._convert_weight_to_int4pack_for_cpu(q, 1),
        torch.stack([scales.t(), zeros.t()], -1).contiguous(),
    )


def dequantized4(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The float32 weight the int4 kernel multiplies by (its products' reference)."""
    q, scales, zeros = parts
    groups = q.float().view(q.shape[0], -1, INT4_GROUP) - 8
    return (groups * scales.float()[..., None] + zeros.float()[..., None]).view(q.shape)


def int4_error(parts, packed) -> float:
    """The int4 kernel's product of a random row against its dequantized reference, over the
    reference's largest output (a check of the kernel on this shape)."""
    x = torch.randn(1, parts[0].shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    with torch.inference_mode():
        ref = x.float() @ dequantized4(parts).T
        got = torch._weight_int4pack_mm_for_cpu(x, packed[0], INT4_GROUP, packed[1]).float()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


def copy_bytes4(layers: list[RowLinear]) -> int:
    """Bytes the int4 copies of these layers take: half a byte per weight, a bf16 scale and
    zero point per group."""
    return sum(m.weight.numel() // 2 + 4 * (m.weight.numel() // INT4_GROUP) for m in layers)


def copy_bytes(layers: list[RowLinear]) -> int:
    """Bytes the int8 copies of these layers take: an int8 per weight, a bf16 scale per row."""
    return sum(m.weight.numel() + 2 * m.out_features for m in layers)


def make(
    model: torch.nn.Module,
    mode: str = "auto",
    *,
    available: int | None = None,
    probe=None,
) -> str:
    """Give the model's RowLinear layers int8 copies for decode passes (copy_rows) where `mode`
    asks ("int8": every layer the kernel takes; "auto": those whose shape measured MIN_GAIN
    faster at load; "base": none), while the copies fit in PACK_SHARE of the memory available
    (`available` bytes; psutil's reading by default). Returns "int8: ..." or "base: ..." with
    why, for status (`model.decode_weights`)."""
    if mode not in MODES:
        raise ValueError(f"decode_weights: must be one of {', '.join(MODES)}")
    layers = [m for m in model.modules() if isinstance(m, RowLinear)]
    for m in layers:
        m.int8 = m.int4 = None
    if mode == "base":
        return "base: set"
    if not layers:
        return f"base: {mode if mode == 'int4' else 'int8'} copies are for a bf16 model on a CPU"
    if mode == "int4":
        return _make4(layers, available)
    if not kernel():
        return "base: this torch has no int8 weight-only kernel"
    taken = [m for m in layers if takes(m)]
    if not taken:
        return f"base: no layer's input width is a multiple of {K_MULTIPLE} (the kernel's block)"
    hidden = min(m.in_features for m in taken)
    if mode == "auto" and hidden < MIN_HIDDEN:  # (tests' tiny bf16 models keep bf16's tokens)
        return f"base: layers {hidden} wide < {MIN_HIDDEN}: per-op overheads set the pace"
    size = copy_bytes(taken)
    if no_room := _no_room(size, available, "int8"):
        return no_room
    with _one_thread():
        copies = {m: quantize(m.weight) for m in taken}
    why = ""
    if mode == "auto":
        probe = probe or measure
        gains = {}
        for m in taken:  # (each shape's first layer, on its own weights)
            shape = (m.out_features, m.in_features)
            if shape not in gains:
                mv, int8, error = probe(m.weight.detach(), copies[m])
                gains[shape] = mv / max(int8, 1e-12) if error < TOLERANCE else 0.0
        taken = [m for m in taken if gains[(m.out_features, m.in_features)] >= MIN_GAIN]
        shown = ", ".join(f"{o}x{i} {g:.2f}x" for (o, i), g in gains.items())
        if not taken:
            return f"base: int8 not faster than bf16 at load ({shown})"
        why = f"; one-row int8 / bf16 speed at load: {shown}"
        size = copy_bytes(taken)
    for m in taken:
        m.int8 = copies[m]
        m.int8_from = m.weight.data_ptr()
    return (
        f"int8: {len(taken)} of {len(layers)} linear layers' decode products "
        f"({size / 2**20:.0f} MiB of copies){why}; {_rows(taken)}"
    )


def _no_room(size: int, available: int | None, kind: str) -> str | None:
    """Why copies of `size` bytes are not made (more than PACK_SHARE of the memory available:
    `available` bytes, psutil's reading by default), or None when they fit."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    if size > PACK_SHARE * available:
        return (
            f"base: {size / 2**20:.0f} MiB of {kind} copies > {PACK_SHARE:.0%} of available memory"
        )
    return None


@contextmanager
def _one_thread() -> Iterator[None]:
    """The block on one intra-op thread: quantizing is short elementwise passes, and a busy
    neighbour stalls each parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _make4(layers: list[RowLinear], available: int | None) -> str:
    """decode_weights="int4" (asked for, not measured: 4 bits move a decode's tokens more than
    8 do; docs/benchmarks.md, "Int4 copies for one-row decodes"): every layer whose shape the
    kernel takes and on which it agreed with its dequantized reference at load."""
    if not kernel4():
        return "base: this torch has no int4 weight-only kernel"
    taken = [m for m in layers if takes4(m)]
    if not taken:
        return (
            f"base: no layer's input width is a multiple of {INT4_GROUP} and output width "
            "of 16 (the int4 kernel's blocks)"
        )
    if no_room := _no_room(copy_bytes4(taken), available, "int4"):
        return no_room
    copies, errors = {}, {}
    with _one_thread():
        for m in taken:
            parts = quantize4(m.weight)
            copies[m] = pack4(parts)
            shape = (m.out_features, m.in_features)
            if shape not in errors:  # each shape's first layer, on its own weights
                errors[shape] = int4_error(parts, copies[m])
    wrong = sorted(shape for shape, e in errors.items() if e >= TOLERANCE)
    taken = [m for m in taken if (m.out_features, m.in_features) not in wrong]
    if not taken:
        return "base: the int4 kernel disagreed with its reference on every shape"
    for m in taken:
        m.int4 = copies[m]
        m.int4_from = m.weight.data_ptr()
    why = "".join(f"; {o}x{i} kernel wrong, bf16 kept" for o, i in wrong)
    return (
        f"int4: {len(taken)} of {len(layers)} linear layers' decode products "
        f"({copy_bytes4(taken) / 2**20:.0f} MiB of copies, groups of {INT4_GROUP}){why}; "
        + _rows(taken)
    )


def _rows(taken: list[RowLinear]) -> str:
    """Set the layers' `copy_rows` (copy_rows' measure) and say it, for status."""
    rows, why = copy_rows(taken)
    for m in taken:
        m.copy_rows = rows
    if rows == 1:
        return f"one-row passes only ({why})"
    return f"passes of up to {rows} rows ({why})"


def copy_rows(layers: list[RowLinear], repeats: int = 3) -> tuple[int, str]:
    """The most rows a decode pass multiplies by the layers' copies (1, or one of ROWS_TRIED),
    and why. A few rows by the blocked bf16 copy cost about one row's time on the matrix units,
    while the copies' kernels cost about a row's time per row, on fewer bytes: on the Zen 4 the
    int4 copies of every decoder layer took 0.38x the blocked copy's time at two rows, 0.71x at
    four and 1.1x at six, the int8 copies 0.85x at two and 1.4x at four (docs/benchmarks.md,
    "Copies for decodes of a few rows"); a CPU with AMX multiplies rows faster still. So it is
    measured: the products of the first layers (in the model's order, up to SAMPLE_BYTES of
    bf16 weights: more than a cache holds, so that the weights stream from memory as in a
    decode pass) of random rows inside `decoding`, by the copies and by the path the pass
    takes otherwise, on one thread, the best of `repeats` interleaved rounds of process time
    after a warm-up of each; a count is kept where the copies were MIN_GAIN faster, and every
    smaller count too. Layers under MIN_HIDDEN wide (the tests' tiny models: per-op overheads
    set the pace) keep one row, unmeasured."""
    narrow = min((m.in_features for m in layers), default=0)
    if narrow < MIN_HIDDEN:
        return 1, f"layers {narrow} wide < {MIN_HIDDEN}: not measured"
    sample, size = [], 0
    for m in layers:
        if size >= SAMPLE_BYTES:
            break
        sample.append(m)
        size += m.weight.numel() * m.weight.element_size()
    try:
        chosen, shown = _measure_rows(sample, repeats)
    except RuntimeError as e:  # a kernel that refuses several rows: one-row passes as before
        return 1, f"the kernel refused several rows at load: {e}"
    finally:
        for m in sample:
            m.copy_rows = 1
    return chosen, f"the copies' speed over bf16's at load: {', '.join(shown)}"


def _measure_rows(sample: list[RowLinear], repeats: int) -> tuple[int, list[str]]:
    """copy_rows' measurement: (the count chosen, each count's gain as shown in status)."""
    chosen, shown = 1, []
    with _one_thread(), torch.inference_mode(), decoding():
        for rows in ROWS_TRIED:
            gen = torch.Generator().manual_seed(rows)
            xs = {
                m.in_features: torch.randn(rows, m.in_features, generator=gen).bfloat16()
                for m in sample
            }

            def by_copies(on: bool, rows: int = rows) -> None:
                for m in sample:
                    m.copy_rows = rows if on else 1

            def products(xs: dict = xs) -> None:
                for m in sample:
                    m(xs[m.in_features])

            best = interleaved_seconds(
                (True, False), by_copies, products, repeats, clock=time.process_time
            )
            copies, bf16 = (min(best[k][1:]) for k in (True, False))  # (first: warm-up)
            gain = bf16 / max(copies, 1e-9)
            shown.append(f"{rows} rows {gain:.2f}x")
            if gain < MIN_GAIN:
                break
            chosen = rows
    return chosen, shown


def int4_bytes(model: torch.nn.Module) -> int:
    """Bytes of the int4 copies `make` made (status: `model.int4_bytes`)."""
    return sum(
        sum(t.numel() * t.element_size() for t in m.int4)
        for m in model.modules()
        if isinstance(m, RowLinear) and m.int4 is not None
    )


def int8_bytes(model: torch.nn.Module) -> int:
    """Bytes of the int8 copies `make` made (status: `model.int8_bytes`)."""
    return sum(
        m.int8[0].numel() + m.int8[1].numel() * m.int8[1].element_size()
        for m in model.modules()
        if isinstance(m, RowLinear) and m.int8 is not None
    )
