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
"""

from __future__ import annotations

import numpy as np

# Elements of a block's column matrix: ~1 MiB in float32, so a block's gather, GEMM and
# accumulation stay in cache (measured: 2^16..2^18 are within a few percent).
BLOCK_ELEMENTS = 1 << 18
# Fewest columns per block, so a huge C*kh*kw still makes GEMMs of some width.
MIN_BLOCK_COLUMNS = 16


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
        slot = {phase: k for k, phase in enumerate(self.used)}
        # Per tap (row-major over the kernel): (slot, column offset).
        self.offsets = [(slot[phase], offset) for phase, offset in phase_offsets]

    def columns(self, n: int) -> int:
        """Grid columns spanned by the outputs of n images (the last one's tail omitted)."""
        (ho, wo), wq = self.out_hw, self.grid[1]
        return max(0, (n - 1) * self.size + (ho - 1) * wq + wo)

    def step(self, rows: int) -> int:
        return max(MIN_BLOCK_COLUMNS, BLOCK_ELEMENTS // max(rows, 1))

    def blocks(self, n: int, rows: int) -> list[tuple[int, int]]:
        """Column ranges of the output grid, each `rows` x width <= one block."""
        total, step = self.columns(n), self.step(rows)
        return [(a, min(a + step, total)) for a in range(0, total, step)]

    def buffer(self, n: int, rows: int, dtype) -> np.ndarray:
        """Room for the widest block of `rows` rows over n images."""
        return np.empty(rows * min(self.step(rows), self.columns(n)), dtype=dtype)

    def workspace(self, c: int, o: int, n: int, rows: int) -> int:
        """Elements of the largest temporary: the phases of c channels, the grid of o
        channels, or one block of `rows` rows."""
        block = rows * min(self.step(rows), self.columns(n))
        return max(max(len(self.used) * c, o) * n * self.size, block)

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

    def unpack(self, phases: np.ndarray, n: int, hw, padding) -> np.ndarray:
        """The image of spatial size `hw` cut from the padded frame at `padding` out of
        the phases (slots, C, N * Hq * Wq): (N, C) + hw; rows and columns past the frame,
        and phases no tap wrote, are zeros."""
        c = phases.shape[1]
        frame = [min(size, g * s - p) for size, g, s, p in zip(hw, self.grid, self.stride, padding)]
        out = np.zeros((n, c) + tuple(hw), dtype=phases.dtype)
        grids = phases.reshape((len(self.used), c, n) + self.grid)
        for k, phase in enumerate(self.used):
            regions = self._slices(frame, phase, padding)
            if regions is not None:
                grid, image = regions
                out[(slice(None), slice(None)) + image] = grids[
                    (k, slice(None), slice(None)) + grid
                ].transpose(1, 0, 2, 3)
        return out

    def to_grid(self, g: np.ndarray) -> np.ndarray:
        """Window values g (N, O, Ho, Wo) -> (O, N * Hq * Wq), zero off the windows."""
        n, o, ho, wo = g.shape
        out = np.zeros((o, n) + self.grid, dtype=g.dtype)
        out[:, :, :ho, :wo] = g.transpose(1, 0, 2, 3)
        return out.reshape(o, n * self.size)

    def from_grid(self, grid: np.ndarray, n: int) -> np.ndarray:
        """to_grid's inverse: (O, N * Hq * Wq) -> (N, O, Ho, Wo), a fresh array."""
        ho, wo = self.out_hw
        o = grid.shape[0]
        view = grid.reshape((o, n) + self.grid)[:, :, :ho, :wo]
        return np.ascontiguousarray(view.transpose(1, 0, 2, 3))

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
        groups, c = cols.shape[0], phases.shape[1]
        for t, (k, offset) in enumerate(self.offsets):
            target = phases[k, :, offset + a : offset + b].reshape(groups, c // groups, -1)
            target += cols[:, t]


def conv2d(x, w, stride, padding, dilation, groups, out_hw) -> np.ndarray:
    """Cross-correlation x (N, C, H, W) with w (O, C/groups, kh, kw) -> (N, O, Ho, Wo)."""
    (n, c), (o, cg, kh, kw) = x.shape[:2], w.shape
    if x.size == 0 or w.size == 0:  # an empty sum, or nothing to compute
        return np.zeros((n, o) + tuple(out_hw), dtype=x.dtype)
    taps = Taps(x.shape[2:], (kh, kw), stride, padding, dilation, out_hw)
    phases = taps.pack(x)
    # (G, O/G, taps * C/G), tap-major like the gathered columns.
    wk = w.reshape(groups, o // groups, cg, kh * kw).transpose(0, 1, 3, 2)
    wk = wk.reshape(groups, o // groups, kh * kw * cg)
    out = np.empty((o, n * taps.size), dtype=x.dtype)
    rows = kh * kw * c
    buffer = taps.buffer(n, rows, x.dtype)
    for a, b in taps.blocks(n, rows):
        cols = taps.gather(phases, a, b, groups, buffer)
        np.matmul(wk, cols, out=out[:, a:b].reshape(groups, o // groups, b - a))
    del phases
    return taps.from_grid(out, n)


def conv_transpose2d(x, w, stride, dilation, groups, canvas_hw, padding, out_hw):
    """conv2d's adjoint in x: x (N, C_in, H, W), w (C_in, C_out/groups, kh, kw) ->
    (N, C_out) + out_hw, the canvas of every window cut at `padding` (rows past the
    canvas are zeros: output_padding)."""
    (n, c, h, wd), (_, og, kh, kw) = x.shape, w.shape
    if x.size == 0 or w.size == 0:
        return np.zeros((n, og * groups) + tuple(out_hw), dtype=x.dtype)
    taps = Taps(canvas_hw, (kh, kw), stride, (0, 0), dilation, (h, wd))
    coefficients = taps.to_grid(x)
    # (G, taps * C_out/G, C_in/G): the transposed weight, tap-major.
    wt = w.reshape(groups, c // groups, og, kh * kw).transpose(0, 3, 2, 1)
    wt = wt.reshape(groups, kh * kw * og, c // groups)
    canvas = np.zeros((len(taps.used), og * groups, n * taps.size), dtype=x.dtype)
    rows = kh * kw * og * groups
    buffer = taps.buffer(n, rows, x.dtype)
    for a, b in taps.blocks(n, rows):
        cols = buffer[: rows * (b - a)].reshape(groups, kh * kw * og, b - a)
        np.matmul(wt, coefficients[:, a:b].reshape(groups, c // groups, b - a), out=cols)
        taps.scatter_add(canvas, cols.reshape(groups, kh * kw, og, b - a), a, b)
    del coefficients
    return taps.unpack(canvas, n, out_hw, padding)


def weight_grad(x, g, kernel, stride, padding, dilation, groups) -> np.ndarray:
    """conv2d's gradient in w: sum over (n, Y, X) of g[n, o, Y, X] times the window
    x_pad[n, c, Y*s + i*d, X*s + j*d] -> (O, C/groups, kh, kw)."""
    (n, c), (o, kh, kw) = x.shape[:2], (g.shape[1], *kernel)
    if x.size == 0 or g.size == 0:
        return np.zeros((o, c // groups, kh, kw), dtype=x.dtype)
    taps = Taps(x.shape[2:], kernel, stride, padding, dilation, g.shape[2:])
    phases, coefficients = taps.pack(x), taps.to_grid(g)
    cg, og, k = c // groups, o // groups, kh * kw
    dw = np.zeros((groups, og, k * cg), dtype=x.dtype)
    part = np.empty_like(dw)
    rows = k * c
    buffer = taps.buffer(n, rows, x.dtype)
    for a, b in taps.blocks(n, rows):
        cols = taps.gather(phases, a, b, groups, buffer)
        gb = coefficients[:, a:b].reshape(groups, og, b - a)
        dw += np.matmul(gb, cols.transpose(0, 2, 1), out=part)
    return np.ascontiguousarray(dw.reshape(groups, og, k, cg).transpose(0, 1, 3, 2)).reshape(
        o, cg, kh, kw
    )
