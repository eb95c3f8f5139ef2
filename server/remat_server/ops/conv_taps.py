"""Convolution kernels without im2col: each block of output positions is one GEMM.

im2col copies every kernel tap's window of the input into one (C*kh*kw, L) matrix,
kh*kw times the input; its adjoint (col2im) needs the same matrix again. Here the
zero-padded input is laid out once so that every tap reads a contiguous column range,
and a block of a few thousand output positions gathers its taps into a small,
cache-sized column matrix: the GEMMs keep their long inner dimension (C*kh*kw), but
no temporary is bigger than the padded input or the output (plus one block).

Layout (`Taps`): the padded image (Hp, Wp) is split into its stride phases -- the rows
and columns congruent to (rh, rw) modulo the stride -- each on a common grid
(Hq, Wq) = ceil((Hp, Wp) / stride), channel-major and flattened over (image, row,
column): `phases[slot, c, (n * Hq + y) * Wq + x]`. Only the phases some tap reads get a
slot (a 1x1 kernel with stride 2 reads one phase of four; a stride larger than the
image would otherwise make stride**2 mostly empty grids). Output position (n, Y, X)
is column m = (n * Hq + Y) * Wq + X of the same grid; tap (i, j) reads the padded input
at (Y * sh + i * dh, X * sw + j * dw), which is phase ((i*dh) % sh, (j*dw) % sw) at
column m + (i*dh // sh) * Wq + (j*dw // sw): one offset per tap. Grid columns with
Y >= Ho or X >= Wo are padding: computed and dropped (conv2d), or given zero weight
(the weight gradient and the transposed convolution read them from a zero-filled grid).

Images go through in chunks (`Taps.chunks`) of about CHUNK_ELEMENTS per phase or grid
array: a chunk's phases, grid and canvas are laid out, used and dropped before the
next, and each chunk's output rows are written straight into the result (no
whole-batch grid or canvas, no crop copy). So the temporaries (`*_scratch`, exact) are
one chunk's arrays, one block and the re-laid weight, whatever the batch size.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from remat_proto import dtypes

from .elementwise import BUFFER, MIN_BUFFERED_RUNS

# Elements of a block's column matrix: ~1 MiB in float32, so a block's gather, GEMM and
# accumulation stay in cache (measured: 2^16..2^18 are within a few percent).
BLOCK_ELEMENTS = 1 << 18
# Fewest columns per block, so a huge C*kh*kw still makes GEMMs of some width.
MIN_BLOCK_COLUMNS = 16
# Elements of a chunk's largest phase or grid array (at least one image): within a few
# percent of whole-batch arrays (measured: 2^16 costs ~5-10%, 2^17 ~0-5%).
CHUNK_ELEMENTS = 1 << 17
CHUNK_SHARE = 8  # a chunk is at most 1/CHUNK_SHARE of the batch


def clip(start: int, count: int, step: int, offset: int, size: int):
    """Positions q in [0, count) whose index (start + q) * step + offset lies in
    [0, size): (slice of q, slice of the indices), or None when there is none."""
    lo = max(0, -(offset // step) - start)
    hi = min(count, (size - 1 - offset) // step - start + 1)
    if hi <= lo:
        return None
    first = (start + lo) * step + offset
    return slice(lo, hi), slice(first, first + (hi - lo - 1) * step + 1, step)


def virtual(shape, dtype) -> np.ndarray:
    """A read-only array of `shape` (C order) with no memory behind it, for replaying a
    forward's views in a scratch rule (their shapes, strides, contiguity). Never read it."""
    base = np.empty(1, dtype=dtypes.NUMPY.get(dtype, dtype))
    strides, step = [], base.itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return as_strided(base, shape=tuple(shape), strides=strides[::-1], writeable=False)


def ufunc_buffers(*operands) -> int:
    """Bytes NumPy's ufunc iterator buffers during one call (operands in the loop's
    dtype, broadcast to the call's shape; an in-place target counts as input and as
    output), as NumPy 2.x sets it up: it walks the longest inner run over which every
    operand keeps one stride; when at least `MIN_BUFFERED_RUNS` such runs fit in
    bufsize elements, it gathers as many into a buffer per operand that is not
    C-contiguous (a box of a bigger array, strided or broadcast), even with nothing to
    cast; else no buffer. `elementwise.ufunc_buffers` is the same rule on C-contiguous
    operands, answered from shapes alone (no views to build: a call per graph node)."""
    shape = np.broadcast_shapes(*(a.shape for a in operands))
    views = [np.broadcast_to(a, shape) for a in operands]
    size = math.prod(shape)
    run, steps = 1, None
    for axis in reversed(range(len(shape))):
        if shape[axis] == 1:
            continue
        strides = [v.strides[axis] for v in views]
        if steps is None:
            steps = strides
        elif strides != [step * run for step in steps]:
            break
        run *= shape[axis]
    runs = min(BUFFER // run, size // run) if size else 0
    if runs < MIN_BUFFERED_RUNS:
        return 0
    return sum(runs * run * v.itemsize for v in views if not v.flags.c_contiguous)


class Taps:
    """Geometry of a convolution over an image of spatial size `hw` (before padding)
    with `out_hw` windows per axis; see the module's doc for the layout."""

    def __init__(self, hw, kernel, stride, padding, dilation, out_hw):
        self.hw, self.stride, self.padding = tuple(hw), tuple(stride), tuple(padding)
        self.out_hw = tuple(out_hw)
        padded = [n + 2 * p for n, p in zip(hw, padding)]
        self.grid = tuple(-(-p // s) for p, s in zip(padded, stride))  # ceil
        self.size = self.grid[0] * self.grid[1]  # grid columns per image
        sh, sw = stride
        phase_offsets = [
            (
                (i * dilation[0]) % sh * sw + (j * dilation[1]) % sw,
                (i * dilation[0]) // sh * self.grid[1] + (j * dilation[1]) // sw,
            )
            for i in range(kernel[0])
            for j in range(kernel[1])
        ]
        self.used = sorted({phase for phase, _ in phase_offsets})  # slot -> phase
        self.block_elements = BLOCK_ELEMENTS  # `chunks` lowers it for small batches
        slot = {phase: k for k, phase in enumerate(self.used)}
        # Per tap (row-major over the kernel): (slot, column offset).
        self.offsets = [(slot[phase], offset) for phase, offset in phase_offsets]

    def columns(self, n: int) -> int:
        """Grid columns spanned by the outputs of n images (the last one's tail omitted)."""
        (ho, wo), wq = self.out_hw, self.grid[1]
        return max(0, (n - 1) * self.size + (ho - 1) * wq + wo)

    def step(self, rows: int) -> int:
        return max(MIN_BLOCK_COLUMNS, self.block_elements // max(rows, 1))

    def blocks(self, n: int, rows: int) -> list[tuple[int, int]]:
        """Column ranges of the output grid, each `rows` x width <= one block."""
        total, step = self.columns(n), self.step(rows)
        return [(a, min(a + step, total)) for a in range(0, total, step)]

    def buffer(self, n: int, rows: int, dtype) -> np.ndarray:
        """Room for the widest block of `rows` rows over n images."""
        return np.empty(rows * min(self.step(rows), self.columns(n)), dtype=dtype)

    def chunks(self, n: int, c: int, o: int) -> list[slice]:
        """Images per chunk: the phases of c channels and the grid of o channels of a
        chunk hold about CHUNK_ELEMENTS each (at least one image). Sets the blocks' size
        too: BLOCK_ELEMENTS, but at most twice a chunk's phases or grid, else a small
        batch's one block would be its whole column matrix, kh*kw times its input
        (measured: capping at once the chunk's array costs the transposed conv ~20%)."""
        per_image = max(len(self.used) * c, o) * self.size
        # At most an eighth of the batch too: a small batch's temporaries then stay a
        # small share of its activations (the memory model counts them: `scratch`).
        step = max(1, min(CHUNK_ELEMENTS // max(per_image, 1), -(-n // CHUNK_SHARE)))
        step = -(-n // -(-n // step)) if n else step  # as many chunks, evened out
        self.block_elements = min(BLOCK_ELEMENTS, 2 * min(step, n) * per_image)
        return [slice(a, min(a + step, n)) for a in range(0, n, step)]

    def workspace(self, c: int, o: int, n: int, rows: int) -> int:
        """Elements of the largest temporary: a chunk's phases of c channels or grid of
        o channels, or one block of `rows` rows."""
        k = self.chunks(n, c, o)[0].stop if n else 0
        return max(max(len(self.used) * c, o) * k * self.size, self.block(k, rows))

    def block(self, n: int, rows: int) -> int:
        """Elements of `buffer(n, rows)`."""
        return rows * min(self.step(rows), self.columns(n))

    def _slices(self, sizes, phase: int, padding):
        """(grid region, image region) of one phase for an image of `sizes` rows and
        columns placed at `padding` in the padded frame; None if it has no pixel."""
        grid, image = [], []
        for size, p, s, r in zip(sizes, padding, self.stride, divmod(phase, self.stride[1])):
            first = (r - p) % s  # first image row in this phase
            count = len(range(first, size, s))
            if count == 0:
                return None
            start = (first + p - r) // s
            grid.append(slice(start, start + count))
            image.append(slice(first, first + (count - 1) * s + 1, s))
        return tuple(grid), tuple(image)

    def pack(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, H, W) -> its zero-padded used phases (slots, C, N * Hq * Wq)."""
        n, c = x.shape[:2]
        out = np.zeros((len(self.used), c, n) + self.grid, dtype=x.dtype)
        for k, phase in enumerate(self.used):
            regions = self._slices(self.hw, phase, self.padding)
            if regions is not None:
                grid, image = regions
                out[(k, slice(None), slice(None)) + grid] = x[
                    (slice(None), slice(None)) + image
                ].transpose(1, 0, 2, 3)
        return out.reshape(len(self.used), c, n * self.size)

    def unpack(self, phases: np.ndarray, n: int, hw, padding, out: np.ndarray) -> None:
        """Write into out (N, C) + hw, zero-filled, the image cut from the padded frame at
        `padding` out of the phases (slots, C, N * Hq * Wq); rows and columns past the
        frame, and phases no tap wrote, stay zeros."""
        c = phases.shape[1]
        frame = [min(size, g * s - p) for size, g, s, p in zip(hw, self.grid, self.stride, padding)]
        grids = phases.reshape((len(self.used), c, n) + self.grid)
        for k, phase in enumerate(self.used):
            regions = self._slices(frame, phase, padding)
            if regions is not None:
                grid, image = regions
                out[(slice(None), slice(None)) + image] = grids[
                    (k, slice(None), slice(None)) + grid
                ].transpose(1, 0, 2, 3)

    def to_grid(self, g: np.ndarray) -> np.ndarray:
        """Window values g (N, O, Ho, Wo) -> (O, N * Hq * Wq), zero off the windows."""
        n, o, ho, wo = g.shape
        out = np.zeros((o, n) + self.grid, dtype=g.dtype)
        out[:, :, :ho, :wo] = g.transpose(1, 0, 2, 3)
        return out.reshape(o, n * self.size)

    def from_grid(self, grid: np.ndarray, n: int, out: np.ndarray) -> None:
        """to_grid's inverse: (O, N * Hq * Wq) written into out (N, O, Ho, Wo)."""
        ho, wo = self.out_hw
        o = grid.shape[0]
        out[...] = grid.reshape((o, n) + self.grid)[:, :, :ho, :wo].transpose(1, 0, 2, 3)

    def gather(self, phases, a: int, b: int, groups: int, out: np.ndarray) -> np.ndarray:
        """Columns [a, b) of every tap: (groups, taps * C/groups, b - a), in `out`."""
        c = phases.shape[1]
        cols = out[: len(self.offsets) * c * (b - a)].reshape(
            groups, len(self.offsets), c // groups, b - a
        )
        for t, (k, offset) in enumerate(self.offsets):
            cols[:, t] = phases[k, :, offset + a : offset + b].reshape(groups, c // groups, -1)
        return cols.reshape(groups, -1, b - a)

    def scatter_add(self, phases, cols: np.ndarray, a: int, b: int) -> None:
        """gather's adjoint: add cols (groups, taps, C/groups, b - a) onto the taps."""
        for t, target in enumerate(self.scatter_targets(phases, cols.shape[0], a, b)):
            target += cols[:, t]

    def scatter_targets(self, phases, groups: int, a: int, b: int):
        """Per tap, the (groups, C/groups, b - a) view of the phases its columns add onto."""
        c = phases.shape[1]
        for k, offset in self.offsets:
            yield phases[k, :, offset + a : offset + b].reshape(groups, c // groups, -1)


def tap_major(w, groups: int, transposed: bool) -> np.ndarray:
    """The weight as the GEMMs read it, a fresh copy: conv2d's (G, O/G, taps * C/G), or
    the transposed convolution's (G, taps * C_out/G, C_in/G)."""
    a, b, kh, kw = w.shape
    if transposed:  # w (C_in, C_out/G, kh, kw)
        view = w.reshape(groups, a // groups, b, kh * kw).transpose(0, 3, 2, 1)
        shape = (groups, kh * kw * b, a // groups)
    else:  # w (O, C/G, kh, kw)
        view = w.reshape(groups, a // groups, b, kh * kw).transpose(0, 1, 3, 2)
        shape = (groups, a // groups, kh * kw * b)
    out = np.empty(view.shape, dtype=w.dtype)
    out[...] = view
    return out.reshape(shape)


def conv2d(x, w, stride, padding, dilation, groups, out_hw) -> np.ndarray:
    """Cross-correlation x (N, C, H, W) with w (O, C/groups, kh, kw) -> (N, O, Ho, Wo)."""
    (n, c), (o, _, kh, kw) = x.shape[:2], w.shape
    if x.size == 0 or w.size == 0:  # an empty sum, or nothing to compute
        return np.zeros((n, o) + tuple(out_hw), dtype=x.dtype)
    taps = Taps(x.shape[2:], (kh, kw), stride, padding, dilation, out_hw)
    wk = tap_major(w, groups, transposed=False)  # (G, O/G, taps * C/G)
    out = np.empty((n, o) + tuple(out_hw), dtype=x.dtype)
    chunks, rows = taps.chunks(n, c, o), kh * kw * c
    buffer = taps.buffer(chunks[0].stop, rows, x.dtype)
    for images in chunks:
        m = images.stop - images.start
        phases = taps.pack(x[images])
        grid = np.empty((o, m * taps.size), dtype=x.dtype)
        for a, b in taps.blocks(m, rows):
            cols = taps.gather(phases, a, b, groups, buffer)
            np.matmul(wk, cols, out=grid[:, a:b].reshape(groups, o // groups, b - a))
        del phases
        taps.from_grid(grid, m, out[images])
        del grid  # before the next chunk's arrays
    return out


def conv2d_scratch(x, w, stride, padding, dilation, groups, out_hw) -> int:
    """Bytes of conv2d's temporaries: the weight copy, one block, and a chunk's phases
    and grid."""
    (n, c), (o, _, kh, kw) = x.shape[:2], w.shape
    if math.prod(x.shape) == 0 or math.prod(w.shape) == 0:
        return 0
    taps = Taps(x.shape[2:], (kh, kw), stride, padding, dilation, out_hw)
    k = taps.chunks(n, c, o)[0].stop
    chunk = (len(taps.used) * c + o) * k * taps.size
    elements = math.prod(w.shape) + taps.block(k, kh * kw * c) + chunk
    return elements * dtypes.itemsize(x.dtype)


def conv_transpose2d(x, w, stride, dilation, groups, canvas_hw, padding, out_hw):
    """conv2d's adjoint in x: x (N, C_in, H, W), w (C_in, C_out/groups, kh, kw) ->
    (N, C_out) + out_hw, the canvas of every window cut at `padding` (rows past the
    canvas are zeros: output_padding)."""
    (n, c, h, wd), (_, og, kh, kw) = x.shape, w.shape
    out = np.zeros((n, og * groups) + tuple(out_hw), dtype=x.dtype)
    if x.size == 0 or w.size == 0:
        return out
    taps = Taps(canvas_hw, (kh, kw), stride, (0, 0), dilation, (h, wd))
    wt = tap_major(w, groups, transposed=True)  # (G, taps * C_out/G, C_in/G)
    chunks, rows = taps.chunks(n, og * groups, c), kh * kw * og * groups
    buffer = taps.buffer(chunks[0].stop, rows, x.dtype)
    for images in chunks:
        m = images.stop - images.start
        coefficients = taps.to_grid(x[images])
        canvas = np.zeros((len(taps.used), og * groups, m * taps.size), dtype=x.dtype)
        for a, b in taps.blocks(m, rows):
            cols = buffer[: rows * (b - a)].reshape(groups, kh * kw * og, b - a)
            np.matmul(wt, coefficients[:, a:b].reshape(groups, c // groups, b - a), out=cols)
            taps.scatter_add(canvas, cols.reshape(groups, kh * kw, og, b - a), a, b)
        del coefficients
        taps.unpack(canvas, m, out_hw, padding, out[images])
        del canvas  # before the next chunk's arrays
    return out


def conv_transpose2d_scratch(x, w, stride, dilation, groups, canvas_hw) -> int:
    """Bytes of conv_transpose2d's temporaries: the weight copy, one block, and a
    chunk's coefficient grid and canvas."""
    (n, c, h, wd), (_, og, kh, kw) = x.shape, w.shape
    if math.prod(x.shape) == 0 or math.prod(w.shape) == 0:
        return 0
    taps = Taps(canvas_hw, (kh, kw), stride, (0, 0), dilation, (h, wd))
    k = taps.chunks(n, og * groups, c)[0].stop
    rows = kh * kw * og * groups
    chunk = (c + len(taps.used) * og * groups) * k * taps.size
    elements = math.prod(w.shape) + taps.block(k, rows) + chunk
    # NumPy's buffers of scatter_add's largest call, over every width of block.
    canvas = virtual((len(taps.used), og * groups, k * taps.size), x.dtype)
    chunks = taps.chunks(n, og * groups, c)
    sizes = {chunk.stop - chunk.start for chunk in (chunks[0], chunks[-1])}
    widths = {b - a for m in sizes for a, b in taps.blocks(m, rows)}
    buffers = 0
    for width in widths:
        cols = virtual((groups, kh * kw, og, width), x.dtype)
        for t, target in enumerate(taps.scatter_targets(canvas, groups, 0, width)):
            buffers = max(buffers, ufunc_buffers(target, cols[:, t], target))
    return elements * dtypes.itemsize(x.dtype) + buffers


def scatter_tap(out, part, start, tap, stride, dilation, padding, groups=1, replay=False):
    """Add part (N, G, C/G, rows, cols), tap `tap`'s values of the windows whose first
    row and column are `start`, onto out (N, C, H, W) cut at `padding` (values falling
    outside are dropped). replay: on virtual arrays, return NumPy's buffers of the add
    instead of doing it."""
    spans = [
        clip(s, count, st, t * d - p, size)
        for s, count, st, t, d, p, size in zip(
            start, part.shape[3:], stride, tap, dilation, padding, out.shape[2:]
        )
    ]
    if None in spans:
        return 0
    (ys, yt), (xs, xt) = spans
    target = out[:, :, yt, xt]
    target = np.reshape(target, target.shape[:1] + (groups, -1) + target.shape[2:], copy=False)
    if replay:
        return ufunc_buffers(target, part[..., ys, xs], target)
    target += part[..., ys, xs]
    return 0


def weight_grad(x, g, kernel, stride, padding, dilation, groups) -> np.ndarray:
    """conv2d's gradient in w: sum over (n, Y, X) of g[n, o, Y, X] times the window
    x_pad[n, c, Y*s + i*d, X*s + j*d] -> (O, C/groups, kh, kw)."""
    (n, c), (o, kh, kw) = x.shape[:2], (g.shape[1], *kernel)
    if x.size == 0 or g.size == 0:
        return np.zeros((o, c // groups, kh, kw), dtype=x.dtype)
    taps = Taps(x.shape[2:], kernel, stride, padding, dilation, g.shape[2:])
    cg, og, k = c // groups, o // groups, kh * kw
    dw = np.zeros((groups, og, k * cg), dtype=x.dtype)
    part = np.empty_like(dw)
    chunks, rows = taps.chunks(n, c, o), k * c
    buffer = taps.buffer(chunks[0].stop, rows, x.dtype)
    for images in chunks:
        m = images.stop - images.start
        phases, coefficients = taps.pack(x[images]), taps.to_grid(g[images])
        for a, b in taps.blocks(m, rows):
            cols = taps.gather(phases, a, b, groups, buffer)
            gb = coefficients[:, a:b].reshape(groups, og, b - a)
            dw += np.matmul(gb, cols.transpose(0, 2, 1), out=part)
        del phases, coefficients, gb  # before the next chunk's arrays
    return np.ascontiguousarray(dw.reshape(groups, og, k, cg).transpose(0, 1, 3, 2)).reshape(
        o, cg, kh, kw
    )


def weight_grad_scratch(x, g, kernel, stride, padding, dilation, groups) -> int:
    """Bytes of the weight gradient's temporaries: one block, the (G, O/G, taps * C/G)
    accumulator and its addend, and a chunk's phases and coefficient grid, which are
    dropped before the result (a weight-sized copy of the accumulator) is made."""
    (n, c), o = x.shape[:2], g.shape[1]
    if math.prod(x.shape) == 0 or math.prod(g.shape) == 0:
        return 0
    taps = Taps(x.shape[2:], kernel, stride, padding, dilation, g.shape[2:])
    k = taps.chunks(n, c, o)[0].stop
    rows = kernel[0] * kernel[1] * c
    chunk = (len(taps.used) * c + o) * k * taps.size
    weight = o * rows // groups
    return (taps.block(k, rows) + weight + max(chunk, weight)) * dtypes.itemsize(x.dtype)
