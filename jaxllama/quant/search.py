"""llama.cpp's scale searches (`ggml-quants.c`), vectorised over groups, bit for bit.

Every function takes the values of many groups at once as `x[n, G]`: element index first, group
second, so that the sums over a group run as llama.cpp runs them, left to right in float32 (one
contiguous row added per step), while everything else is elementwise over all groups. Each
float32 operation is the one the C code performs, in its order (`w*x*l` is `(w*x)*l`), which is
what makes the bytes identical: ggml-base, where these functions live, is built without FMA
contraction or fast-math. `nearest_int` (adding 1.5*2^23) rounds half to even, as `np.rint` does.
"""

from __future__ import annotations

import numpy as np

F = np.float32
GROUP_MAX_EPS = F(1e-15)


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 from +0.0, one row at a time: C's `for (i...) s += a[i]` in float32."""
    s = np.zeros(a.shape[1:], F)
    for row in a:
        s += row
    return s


def rint_clip(v: np.ndarray, lo: int | None, hi: int | None) -> np.ndarray:
    """`MAX(lo, MIN(hi, nearest_int(v)))` as int32 (clipping first keeps NaN lanes harmless)."""
    v = np.nan_to_num(v, nan=0.0, posinf=4194303.0, neginf=-4194303.0)
    v = np.clip(v, -4194303.0 if lo is None else lo, 4194303.0 if hi is None else hi)
    return np.rint(v).astype(np.int32)


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, the signed value at the first position holding it), per group."""
    ax = np.abs(x)
    i = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return ax[i, cols], x[i, cols]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return a / b


def make_qx_quants(nmax: int, x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric levels in [-nmax, nmax) with the best of 19 scales (rmse_type 1).

    Returns (scale [G], L [n, G] in 0..2*nmax-1); all-zero groups get scale 0 and L 0."""
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)
    w = x * x if qw is None else qw
    wx = w * x

    def trial(iscale):
        l = rint_clip(iscale * x, -nmax, nmax - 1)
        lf = l.astype(F)
        return l, seqsum(wx * lf), seqsum(w * lf * lf)

    l, sumlx, suml2 = trial(_div(F(-nmax), mx))
    L = l + nmax
    scale = np.where(suml2 != 0, _div(sumlx, suml2), F(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(_div(-(F(nmax) + F(0.1) * F(step)), mx))
        with np.errstate(over="ignore", invalid="ignore"):
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, l + nmax, L)
        scale = np.where(better, _div(sumlx, suml2), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F(0), scale), np.where(zero, 0, L)


def _refine(nmax_lo: int | None, nmax_hi: int, x: np.ndarray, w: np.ndarray, L: np.ndarray,
            sumlx: np.ndarray, suml2: np.ndarray, need_sl2: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coordinate descent of make_q3_quants / make_qp_quants: up to 5 sweeps, each element in
    turn moved to the level that maximises sumlx^2/suml2 if that helps; a group stops after a
    sweep that changed nothing."""
    alive = np.ones(x.shape[1], bool)
    for _ in range(5):
        changed = np.zeros(x.shape[1], bool)
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], L[i].astype(F)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = alive & (slx > 0) & ((sl2 > 0) if need_sl2 else True)
            new = rint_clip(_div(xi * sl2, slx), nmax_lo, nmax_hi)
            nf = new.astype(F)
            ok &= new != L[i]
            slx = slx + wi * xi * nf
            sl2 = sl2 + wi * nf * nf
            with np.errstate(over="ignore", invalid="ignore"):
                ok &= ((sl2 > 0) if not need_sl2 else True) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(ok, new, L[i])
            sumlx = np.where(ok, slx, sumlx)
            suml2 = np.where(ok, sl2, suml2)
            changed |= ok
        alive &= changed
        if not alive.any():
            break
    return L, sumlx, suml2


def make_q3_quants(nmax: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K's sub-block search (do_rmse): levels in [-nmax, nmax) weighted by x^2, refined."""
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)
    L = rint_clip(_div(F(-nmax), mx) * x, -nmax, nmax - 1)
    w = x * x
    lf = L.astype(F)
    sumlx, suml2 = seqsum(w * x * lf), seqsum(w * lf * lf)
    L, sumlx, suml2 = _refine(-nmax, nmax - 1, x, w, L, sumlx, suml2, need_sl2=False)
    scale = np.where(suml2 > 0, _div(sumlx, suml2), F(0))
    return np.where(zero, F(0), scale), np.where(zero, 0, L + nmax)


def make_qkx_quants(nmax: int, x: np.ndarray, w: np.ndarray, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants / make_qkx3_quants (identical when weights are given): an affine grid
    `scale*L - the_min`, L in 0..nmax, best of nstep+1 weighted least-squares fits.

    Returns (scale [G], the_min [G] >= 0, L [n, G])."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    lo = np.minimum(lo, F(0))
    flat = hi == lo
    rng = np.where(flat, F(1), hi - lo)
    sum_w = w[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        sum_w += w[i]
        sum_x += w[i] * x[i]

    def err(scale, mn, L):
        d = scale * L.astype(F) + mn - x
        return seqsum(w * (np.abs(d) if use_mad else d * d))

    iscale = F(nmax) / rng
    scale = F(1) / iscale
    L = rint_clip(iscale * (x - lo), 0, nmax)
    best = err(scale, lo, L)
    mn = lo
    for step in range(nstep + 1):
        iscale = _div(F(rmin) + F(rdelta) * F(step) + F(nmax), hi - mn)  # `min` as updated so far
        with np.errstate(invalid="ignore", over="ignore"):
            la = rint_clip(iscale * (x - mn), 0, nmax)
        lf = la.astype(F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_scale = np.where(pos, _div(sum_xl, sum_l2), this_scale)
        this_min = np.where(pos, F(0), this_min)
        with np.errstate(over="ignore", invalid="ignore"):
            cur = err(this_scale, this_min, la)
            better = (D > 0) & (cur < best)
        L = np.where(better, la, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, F(0), scale), np.where(flat, -lo, -mn), np.where(flat, 0, L)


def make_qp_quants(nmax: int, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative sub-block scales (or mins) to 0..nmax with weights: best of 9 scales,
    then refined. Returns (scale [G], L [n, G])."""
    mx = np.maximum(x.max(axis=0), F(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)

    def mse(iscale, L):
        d = x - (F(1) / iscale) * L.astype(F)
        return seqsum(w * d * d)

    iscale = F(nmax) / mx
    best = mse(iscale, rint_clip(iscale * x, None, None))
    for step in range(-4, 5):
        if step == 0:
            continue
        cand = (F(0.1) * F(step) + F(nmax)) / mx
        m = mse(cand, rint_clip(cand * x, None, nmax))
        better = m < best
        best = np.where(better, m, best)
        iscale = np.where(better, cand, iscale)
    L = rint_clip(iscale * x, None, nmax)
    lf = L.astype(F)
    sumlx, suml2 = seqsum(w * x * lf), seqsum(w * lf * lf)
    L, sumlx, suml2 = _refine(None, nmax, x, w, L, sumlx, suml2, need_sl2=True)
    scale = np.where(suml2 > 0, _div(sumlx, suml2), F(0))
    return np.where(zero, F(0), scale), np.where(zero, 0, L)


IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def best_index_int8(values: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8: the nearest entry of a sorted integer table (ties to the upper one).

    The binary search becomes a table lookup: an integer entry is <= v exactly when it is <=
    floor(v), so the count of entries <= v is read at floor(v)."""
    vf = values.astype(F)
    lo, hi = int(values[0]), int(values[-1])
    below = np.searchsorted(vf, np.arange(lo - 1, hi + 1, dtype=F), side="right")  # count <= k
    fl = np.floor(np.clip(v, lo - 1, hi)).astype(np.int32) - (lo - 1)
    mu = np.clip(below[fl], 1, len(vf) - 1)
    idx = np.where(v - vf[mu - 1] < vf[mu] - v, mu - 1, mu)
    idx = np.where(v <= vf[0], 0, idx)
    return np.where(v >= vf[-1], len(vf) - 1, idx)
