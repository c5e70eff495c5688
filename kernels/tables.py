"""Multi-tensor launch tables shared by every Triton kernel of sharpopt.

A parameter set is many separate allocations, so a pass cannot treat it as one flat
buffer. Instead each launch gets one int64 table in device memory::

    [ addresses: NLISTS rows of N   | numel: N | ncols: N | nrows: N | blocks: 2 per program ]

Row ``k`` of the addresses holds ``data_ptr()`` of the ``k``-th operand list (0 where the
list or the entry is absent); a kernel turns an address back into a typed pointer with
``tl.load(...).to(tl.pointer_type(DT))``, which works both compiled and under the
interpreter on CPU tensors. Program ``p`` reads its (tensor, block) pair from the block
part: the index of a chunk of ``CHUNK`` elements for flat plans (the kernel multiplies
it by ``CHUNK``, so the compiler knows the start's divisibility), the first row of a
band of ``rows_per_tile(cols)`` rows for row plans.

Tables are cached per parameter set (keyed on the addresses and sizes), since building
and copying them costs more than the kernels on small models. A plan is split into
several launches when one table would hold more than ``MAX_TENSORS`` tensors or
``MAX_BLOCKS`` programs; reductions then write their per-program partials at
``first + program_id`` so the final fixed-order sum sees them all.

Lifetime. A CUDA graph keeps the addresses of the tables it was captured with, so a
plan built or used while the current stream captures is kept for the rest of the
process (``release_captured_plans`` drops them once the graphs are gone); the others
live in a ``CACHE_SIZE`` LRU, and a table used on another stream than its own is
recorded on that stream (``Tensor.record_stream``), so evicting it never frees memory a
kernel still reads. Every CUDA table is uploaded from a pinned host buffer kept with the
plan, by an asynchronous copy: building a plan never synchronises the stream, and a plan
missed during a capture (new gradient tensors allocated in the graph's pool, for example)
becomes a copy that the graph records and repeats on every replay.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _host
from ..backends.base import rows_are_blocks

# Read once at import, as triton.jit does: the kernels below are interpreted or compiled
# for the whole process.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Elements per vector. 1024 fp32 over 4 warps is 8 per thread, two 16-byte accesses per
# operand, enough loads in flight for a bandwidth-bound pass. The interpreter pays
# ~0.1 ms per operation whatever the vector length, so its vectors are short enough for
# small test tensors to span several programs, and no shorter.
BLOCK = 64 if INTERPRET else 1024
# One configuration, not autotuned: every pass streams memory at a fixed intensity, a
# tuner would time in-place kernels (needing restore_value copies of every operand) and
# would run inside a CUDA-graph capture on the first call. Not yet measured on a GPU.
NUM_WARPS = 4
# Elements per program in flat passes: 16 vectors amortise the table look-ups, and a
# 25 M-parameter model still gives ~1500 programs to fill the GPU.
CHUNK = 2 * BLOCK if INTERPRET else 16 * BLOCK
# Row plans (the gradient-centralisation row sums): a program owns whole rows, an
# (rows x cols) tile of about ROW_TILE elements; cols is the next power of two of the row
# length clamped to [MIN_COLS, MAX_COLS], so short rows do not waste most lanes and long
# rows loop over their columns. One launch per distinct cols value (at most 6). A tile
# is 4 elements per thread, each with its own 64-bit address and mask predicate (the
# tiles are gathered, not vectorised): 4096-element tiles spilled registers, and 8
# elements per thread spilled predicates (a thread has 7 predicate registers).
ROW_TILE = 64 if INTERPRET else 512
MIN_COLS = 4 if INTERPRET else 16
MAX_COLS = 16 if INTERPRET else 512
# Limits on one launch's table (at most ~1 MiB, which stays in L2 while every program
# reads its entries). Beyond them the plan splits into several launches; tests lower them
# to exercise the split.
MAX_TENSORS = 2048
MAX_BLOCKS = 65536
# Plans kept (least recently used dropped): a training loop uses a handful per step.
# Plans a CUDA graph may use are kept apart and never dropped (see the docstring).
CACHE_SIZE = 128
# The interpreter converts fp32 to bf16 by truncation; the GPU rounds to nearest even.
# Under the interpreter the stores round explicitly, so tests see the GPU's numbers.
ROUND_BF16 = tl.constexpr(INTERPRET)
# The reference is a chain of separate eager ops, each rounded; without contraction into
# FMAs most elements match it bit for bit, and the passes are memory bound anyway.
FP_FUSION = False

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


class Launch(NamedTuple):
    table: Tensor     # int64 table on the tensors' device (layout in the module docstring)
    ntensors: int     # N
    nblocks: int      # programs in this launch (the grid)
    first: int        # index of this launch's first program among all of the plan's
    aligned: bool     # every address is 16-byte aligned: vector loads are safe
    cols: int         # column tile of a row plan, 0 for a flat plan
    host: Optional[Tensor] = None  # pinned source of a CUDA table (the copy reads it)


class Plan(NamedTuple):
    launches: Tuple[Launch, ...]
    nblocks: int      # programs over all launches (the number of partials)
    streams: set      # ids of the CUDA streams the tables are recorded on


def dtypes(t: Tensor):
    """(element type, accumulation type) of the kernels for ``t``'s dtype."""
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"sharpopt triton backend: unsupported dtype {t.dtype}; "
                        f"supported: {sorted(str(d) for d in TL_DTYPES)}")
    return TL_DTYPES[t.dtype], (tl.float64 if t.dtype == torch.float64 else tl.float32)


def acc_torch_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cols_for(ncols: int) -> int:
    """Column tile of a row plan for rows of ``ncols`` elements."""
    return min(max(triton.next_power_of_2(max(ncols, 1)), MIN_COLS), MAX_COLS)


def rows_per_tile(cols: int) -> int:
    return max(1, ROW_TILE // cols)


_cache: "OrderedDict[tuple, Plan]" = OrderedDict()
# Plans built or used during a CUDA-graph capture: a graph replays with their tables'
# addresses, so they are never freed by the LRU.
_captured: "dict[tuple, Plan]" = {}


def release_captured_plans() -> int:
    """Drop the plans kept for CUDA graphs (call it only once every graph captured with
    sharpopt's triton passes is deleted). Returns how many were dropped."""
    n = len(_captured)
    _captured.clear()
    return n


def _capturing() -> bool:
    # A capture needs an initialised CUDA context; the check is then one driver query.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def plan(kind: str, lists: Sequence[Optional[Sequence[Optional[Tensor]]]],
         rows_view: bool = False) -> Plan:
    """The launches of a pass over ``lists`` (operand lists aligned by index; None for an
    absent list or entry). ``lists[0]`` decides the sizes. ``kind`` is ``"flat"`` (chunks
    of ``CHUNK`` elements) or ``"rows"`` (bands of whole rows of ``t.view(t.shape[0], -1)``).
    ``rows_view``: a flat pass that reads the (nrows, ncols) columns, so the key must
    include the shapes and not only the sizes.

    The key is built on every call, so it is kept to what decides the table's content,
    and the per-tensor parts (element counts, addresses) are read in C++ where the cpu
    extension is loaded (``sharpopt._host``): in Python they were most of a pass's cost.
    A miss with known sizes (new gradient tensors after ``zero_grad(set_to_none=True)``,
    the common case) reuses the launches' layout and only writes the new addresses.
    """
    first = lists[0]
    sizes = (
        kind, MAX_TENSORS, MAX_BLOCKS, CHUNK, ROW_TILE, MIN_COLS, MAX_COLS,
        first[0].device if len(first) else None,
        _host.numels(first),
        tuple(t.shape[0] if t.dim() else 1 for t in first)
        if kind == "rows" or rows_view else None,
    )
    addresses = tuple(map(_host.data_ptrs, lists))
    key = sizes + addresses
    capturing = _capturing()
    hit = _captured.get(key)
    if hit is None:
        hit = _cache.get(key)
        if hit is None:
            hit = _build(kind, lists, capturing, rows_view, sizes, addresses)
            if not capturing:
                _cache[key] = hit
                if len(_cache) > CACHE_SIZE:
                    _cache.popitem(last=False)
        elif capturing:
            del _cache[key]
        else:
            _cache.move_to_end(key)
        if capturing:
            _captured[key] = hit
    elif capturing:
        # A table uploaded by another graph's copy holds nothing until that graph
        # replays: this graph repeats the copy too.
        _upload_again(hit)
    if not capturing and hit.launches and hit.launches[0].table.is_cuda:
        _record_stream(hit)
    return hit


def _upload_again(pl: Plan) -> None:
    for ln in pl.launches:
        if ln.host is not None:
            ln.table.copy_(ln.host, non_blocking=True)


def _record_stream(pl: Plan) -> None:
    """Tell the allocator that the current stream reads the plan's tables, so that
    freeing them (an LRU eviction) waits for the kernels queued on it."""
    stream = torch.cuda.current_stream(pl.launches[0].table.device)
    if not pl.streams:
        # Built during a capture: its copy runs only when the graph replays, and this
        # eager use may come first.
        _upload_again(pl)
    if stream.stream_id not in pl.streams:
        for ln in pl.launches:
            ln.table.record_stream(stream)
        pl.streams.add(stream.stream_id)


class _Part(NamedTuple):
    """One launch of a layout: which tensors it covers and every word of its table but
    the addresses."""
    index: Optional[Tensor]   # int64 tensor indices, None for all tensors in order
    ntensors: int
    nblocks: int
    first: int
    cols: int
    meta: Tensor              # int64 host words: numel, ncols, nrows (N each), blocks


# Launch layouts by the sizes part of a plan's key (the plan without its addresses):
# host tensors only, so the LRU may drop any of them at any time.
_layouts: "OrderedDict[tuple, Tuple[_Part, ...]]" = OrderedDict()


def _check(kind: str, lists, rows_view: bool) -> None:
    """Every operand on the parameters' device, dense and laid out like its parameter, and
    with row passes, each row of the first list one block of memory."""
    first = lists[0]
    device = first[0].device if len(first) else torch.device("cpu")
    # The kernels walk every operand of a parameter as one flat array in memory order:
    # right for any dense layout (contiguous, channels_last) that all operands share.
    for lst in lists:
        bad = _host.first_unlike(lst, first) if lst is not None else -1
        if bad < 0:
            continue
        t, like = lst[bad], first[bad]
        raise ValueError(f"sharpopt triton backend: tensor {bad} of a pass: every tensor "
                         f"must be on {device}, dense and laid out like its parameter "
                         "(strides "
                         f"{tuple(t.stride())} against {tuple(like.stride())})")
    if kind == "rows" or rows_view:
        for i, t in enumerate(first):     # a row is reduced (or centred) as one block
            if not rows_are_blocks(t):
                raise ValueError(f"sharpopt triton backend: tensor {i}: gradient "
                                 "centralisation needs each row in one block of memory "
                                 f"(strides {tuple(t.stride())})")


def _build(kind: str, lists, capturing: bool, rows_view: bool, sizes: tuple,
           addresses: tuple) -> Plan:
    """The plan of ``plan``'s key ``sizes + addresses`` (its two parts)."""
    _check(kind, lists, rows_view)
    first = lists[0]
    device = first[0].device if len(first) else torch.device("cpu")
    parts = _layouts.get(sizes)
    if parts is None:
        parts = _layouts[sizes] = _layout(kind, first)
        if len(_layouts) > CACHE_SIZE:
            _layouts.popitem(last=False)
    else:
        _layouts.move_to_end(sizes)
    rows = [_words(a, len(first)) for a in addresses]
    launches = tuple(_table(rows, part, device, capturing) for part in parts)
    streams = set()
    if launches and device.type == "cuda" and not capturing:
        streams.add(torch.cuda.current_stream(device).stream_id)
    return Plan(launches, sum(part.nblocks for part in parts), streams)


def _words(addresses, n: int) -> Tensor:
    """The addresses of one operand list (bytes from ``_host.data_ptrs``, a tuple, or None
    for an absent list) as an int64 host tensor of ``n`` words."""
    if addresses is None:
        return torch.zeros(n, dtype=torch.int64)
    if isinstance(addresses, bytes):
        return torch.frombuffer(bytearray(addresses), dtype=torch.int64) if n else \
            torch.zeros(0, dtype=torch.int64)
    return torch.tensor(addresses, dtype=torch.int64).reshape(n)


def _layout(kind: str, first) -> Tuple[_Part, ...]:
    """The launches of a pass over tensors of ``first``'s sizes: each a run of tensors and
    their programs, split where one table would exceed ``MAX_TENSORS`` or ``MAX_BLOCKS``."""
    # units: (tensor index, ncols, nrows, group, starts) -- group separates launches. Every
    # plan records the (nrows, ncols) view, which perturb needs to find an element's row.
    units = []
    for i, t in enumerate(first):
        n = t.numel()
        nrows = t.shape[0] if t.dim() else 1
        ncols = n // nrows if nrows else 0
        if kind == "flat":
            units.append((i, n, ncols, nrows, 0, range(-(-n // CHUNK))))
        else:
            cols = cols_for(ncols)
            units.append((i, n, ncols, nrows, cols, range(0, nrows, rows_per_tile(cols))))
    units.sort(key=lambda u: u[4])  # stable: tensor order kept within a group

    parts: List[_Part] = []
    done = 0
    cur_t: List[Tuple[int, int, int, int]] = []
    cur_b: List[int] = []           # local index, start, local index, start, ...

    def flush(group):
        nonlocal done, cur_t, cur_b
        if cur_b:
            index = [i for i, _, _, _ in cur_t]
            whole = index == list(range(len(first)))
            meta = torch.tensor([n for _, n, _, _ in cur_t] + [c for _, _, c, _ in cur_t]
                                + [r for _, _, _, r in cur_t] + cur_b, dtype=torch.int64)
            parts.append(_Part(None if whole else torch.tensor(index, dtype=torch.int64),
                               len(cur_t), len(cur_b) // 2, done, group or 0, meta))
            done += len(cur_b) // 2
        cur_t, cur_b = [], []

    group = None
    for i, n, ncols, nrows, g, starts in units:
        if g != group:
            flush(group)
            group = g
        pos = 0
        while pos < len(starts):
            if len(cur_t) == MAX_TENSORS or len(cur_b) == 2 * MAX_BLOCKS:
                flush(group)
            local = len(cur_t)
            cur_t.append((i, n, ncols, nrows))
            take = min(MAX_BLOCKS - len(cur_b) // 2, len(starts) - pos)
            for s in starts[pos:pos + take]:
                cur_b += (local, s)
            pos += take
    flush(group)
    return tuple(parts)


def _table(rows: List[Tensor], part: _Part, device, capturing) -> Launch:
    """The launch of layout ``part`` for the operand addresses ``rows`` (one int64 host
    tensor per list, indexed by tensor)."""
    addresses = torch.cat([r if part.index is None else r[part.index] for r in rows]) \
        if rows else torch.zeros(0, dtype=torch.int64)
    # Absent operands (address 0) count as aligned: the kernels never read them.
    aligned = bool((addresses % 16 == 0).all())
    host = torch.cat([addresses, part.meta])
    if device.type != "cuda":            # the interpreter reads the host tensor itself
        return Launch(host.to(device), part.ntensors, part.nblocks, part.first, aligned,
                      part.cols)
    # Pinned and copied without waiting: an asynchronous DMA that needs no stream
    # synchronisation (a blocking copy, or one from pageable memory, would add one to every
    # step that builds a plan; during a CUDA-graph capture it could not be captured at all).
    # The pinned buffer stays with the launch: the copy may still read it after this
    # returns, and a captured copy reads it again on every replay.
    try:
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    except RuntimeError as exc:
        if not capturing:
            raise
        raise RuntimeError(
            "sharpopt triton backend: could not upload a launch table during a CUDA-"
            "graph capture; run one eager step with the same tensors (parameters, "
            "gradients and state at the addresses the capture uses) before capturing"
        ) from exc
    return Launch(table, part.ntensors, part.nblocks, part.first, aligned, part.cols, host)


def scalar(s, device) -> Tuple[Optional[Tensor], float]:
    """A Python float or 0-dim tensor as the (pointer, value) pair the kernels take."""
    if isinstance(s, Tensor):
        if s.numel() != 1 or s.device != device:
            raise ValueError(f"sharpopt triton backend: a tensor scalar must hold one "
                             f"element on {device}, got {tuple(s.shape)} on {s.device}")
        return s, 0.0
    return None, float(s)


def flag(found_inf: Optional[Tensor], device) -> Optional[Tensor]:
    """The non-finite guard's ``[skip, found]`` flag as a kernel argument (None: no guard,
    which Triton compiles as a variant without it)."""
    if found_inf is None:
        return None
    if (found_inf.device != device or found_inf.dtype != torch.float32
            or found_inf.numel() != 2 or not found_inf.is_contiguous()):
        raise ValueError(f"sharpopt triton backend: found_inf must be a contiguous fp32 "
                         f"tensor of 2 elements on {device}, got {found_inf.dtype} "
                         f"{tuple(found_inf.shape)} on {found_inf.device}")
    return found_inf


def launch_options():
    return {"num_warps": NUM_WARPS, "enable_fp_fusion": FP_FUSION}


# -- helpers called from the kernels --------------------------------------------------------

def device_fn(fn):
    """``triton.jit`` for the GPU. Under the interpreter the same code runs as a plain
    function: the interpreter re-patches ``triton.language`` on every call of a jitted
    helper (about 0.5 ms), which would dominate the tests' time."""
    return fn if INTERPRET else triton.jit(fn)


@device_fn
def block_of(table, ntensors, NLISTS: tl.constexpr):
    """(tensor index, block word) of this program, then (numel, ncols, nrows) of that
    tensor. The block word is a chunk index in flat plans, a first row in row plans."""
    b = (NLISTS + 3) * ntensors + 2 * tl.program_id(0)
    t = tl.load(table + b)
    start = tl.load(table + b + 1)
    meta = table + NLISTS * ntensors + t
    return t, start, tl.load(meta), tl.load(meta + ntensors), tl.load(meta + 2 * ntensors)


@device_fn
def address(table, ntensors, t, LIST: tl.constexpr):
    """The raw int64 address of operand list ``LIST`` for tensor ``t`` (0 when absent)."""
    return tl.load(table + LIST * ntensors + t)


@device_fn
def pointer(table, ntensors, t, LIST: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(table + LIST * ntensors + t).to(tl.pointer_type(DT))
    if ALIGNED:
        # The address comes from memory, so the compiler cannot see the allocator's
        # alignment; without this hint every access is a scalar one. The hint goes on
        # the pointer inside this helper: on a helper's call result (as in
        # ``tl.multiple_of(block_of(...), ...)``) Triton 3.6 drops it and 3.9 applies it
        # to every result of the call. Integer arithmetic (clearing the low bits) would
        # not do: the compiler does not carry divisibility through int_to_ptr.
        p = tl.multiple_of(p, 16)
    return p


# The flat passes call load/store with p already advanced to the vector's first element,
# ``offs`` the int32 lanes and ``stop`` the number of elements left: 32-bit offsets and
# masks per element, and one predicate per element in the masked tail.
@device_fn
def load(p, offs, stop, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(p + offs, mask=offs < stop, other=0.0)
    else:
        x = tl.load(p + offs)
    return x


@device_fn
def _bf16_rne(x):
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    r = tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)
    return r.to(tl.bfloat16, bitcast=True)


@device_fn
def store(p, offs, x, stop, MASKED: tl.constexpr):
    if ROUND_BF16 and p.dtype.element_ty == tl.bfloat16 and x.dtype != tl.bfloat16:
        x = _bf16_rne(x)
    else:
        x = x.to(p.dtype.element_ty)
    if MASKED:
        tl.store(p + offs, x, mask=offs < stop)
    else:
        tl.store(p + offs, x)


@device_fn
def scalar_value(ptr, val, ACC: tl.constexpr):
    """A scalar given either in device memory (``ptr``) or by value (``ptr`` is None)."""
    if ptr is None:
        s = tl.full([], val, ACC)
    else:
        s = tl.load(ptr).to(ACC)
    return s


@device_fn
def div(a, b, ACC: tl.constexpr):
    # Plain fp32 division compiles to an approximate instruction; torch rounds correctly.
    if ACC == tl.float32:
        q = tl.div_rn(a, b)
    else:
        q = a / b
    return q


@device_fn
def sqrt(a, ACC: tl.constexpr):
    if ACC == tl.float32:
        r = tl.sqrt_rn(a)
    else:
        r = tl.sqrt(a)
    return r
