"""Row quantizers for each GGML type, producing llama.cpp's bytes (`ggml_quantize_chunk`).

`quantize_rows(x[R, n], type, imatrix[n] | None) -> uint8[R, row_bytes]` follows, per type, the
function llama.cpp runs: `quantize_row_*_ref` without an importance matrix and
`quantize_row_*_impl` with one (Q8_0 ignores it, as llama.cpp does). The scale searches are in
`search.py`; here are the super-block steps and the byte layouts (`ggml-common.h`).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from .search import (F, GROUP_MAX_EPS, IQ4NL_VALUES, best_index_int8, first_absmax, make_q3_quants,
                     make_qkx_quants, make_qp_quants, make_qx_quants, rint_clip, seqsum)

T = GGMLQuantizationType
QK_K = 256


def _f16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the float16 bytes [G, 2], the value read back as float32) — GGML_FP32_TO_FP16 rounds to
    nearest even, as numpy does."""
    h = np.ascontiguousarray(v, F).astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(F)


def _groups(x: np.ndarray, n: int) -> np.ndarray:
    """[..., k*n] values -> [n, G]: element index first (see search.py)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _ungroup(a: np.ndarray, blocks: int) -> np.ndarray:
    """[n, G] -> [blocks, G*n/blocks] in the original order."""
    return a.T.reshape(blocks, -1)


def _sigma2(x: np.ndarray, per: int, factor: float) -> np.ndarray:
    """factor * (sum of squares in order) / per, for each run of `per` values."""
    g = _groups(x, per)
    return F(factor) * seqsum(g * g) / F(per)


def _weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """qw * sqrt(sigma2 + x^2): the imatrix weighting all impl functions use."""
    return qw * np.sqrt(sigma2 + x * x)


def _pack2(L: np.ndarray) -> np.ndarray:
    """[B, 256] 2-bit levels -> [B, 64]: byte j/4+l of each 128 holds L[j+l+32k] at bits 2k."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _nibbles(L: np.ndarray, half: int) -> np.ndarray:
    """[B, 2*half*k] -> [B, half*k]: low nibble from the first `half` of each run, high from the second."""
    q = L.reshape(L.shape[0], -1, 2, half).astype(np.uint8)
    return (q[:, :, 0] & 0xF | (q[:, :, 1] & 0xF) << 4).reshape(L.shape[0], -1)


def _high_bits32(L: np.ndarray) -> np.ndarray:
    """[B, 32] 5-bit levels -> the uint32 of their fifth bits, little-endian bytes [B, 4]."""
    bits = (L.astype(np.uint32) >> 4) & 1
    return (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32).view(np.uint8).reshape(-1, 4)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [B, 8] -> the 12 bytes of Q4_K/Q5_K (get_scale_min_k4's inverse)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    s = np.zeros((ls.shape[0], 12), np.uint8)
    s[:, 0:4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    s[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    s[:, 8:12] = (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4
    return s


def _pack_q3_scales(l: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales [B, 16] (already offset by 32) -> Q3_K's 12 bytes."""
    l = l.astype(np.uint8)
    s = np.zeros((l.shape[0], 12), np.uint8)
    s[:, :8] = (l[:, :8] & 0xF) | (l[:, 8:] & 0xF) << 4
    hi = l >> 4
    for j in range(16):
        s[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return s


def _requant(x: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int,
             off: int) -> np.ndarray:
    """The final pass of every K-quant: levels recomputed from the stored (rounded) scales, for
    sub-blocks whose scale is non-zero; the others keep the search's levels. x, L: [B, S, n];
    d, dm: [B, S]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (x + dm[..., None]) / d[..., None] if dm is not None else x / d[..., None]
    new = rint_clip(v, lo, hi) + off
    return np.where((d != 0)[..., None], new, L)


# ---- legacy types with an importance matrix ---------------------------------------------------

def _legacy_impl(x: np.ndarray, qtype: T, qw: np.ndarray) -> np.ndarray:
    R, n = x.shape
    sigma2 = np.repeat(_sigma2(x, n, 1.0), n // 32)  # per row over the whole row, then per block
    xg = _groups(x, 32)
    w = _weights(xg, _groups(np.broadcast_to(qw, x.shape), 32), sigma2)
    if qtype in (T.Q4_0, T.Q5_0):
        d, L = make_qx_quants(8 if qtype == T.Q4_0 else 16, xg, w)
        head = [_f16(d)[0]]
    else:
        d, mn, L = make_qkx_quants(15 if qtype == T.Q4_1 else 31, xg, w, -0.9, 0.05, 36, False)
        head = [_f16(d)[0], _f16(-mn)[0]]
    L = L.T
    if qtype in (T.Q5_0, T.Q5_1):
        head.append(_high_bits32(L))
    out = np.concatenate(head + [_nibbles(L, 16)], axis=1)
    return out.reshape(R, -1)


# ---- IQ4_NL -----------------------------------------------------------------------------------

def _iq4_nl(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    R, n = x.shape
    xg = _groups(x, 32)
    if qw is None:
        w = xg * xg
    else:
        s2 = seqsum(xg * xg) * F(2.0 / 32)
        w = _weights(xg, _groups(np.broadcast_to(qw, x.shape), 32), s2)
    vals = IQ4NL_VALUES.astype(F)
    amax, mx = first_absmax(xg)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F(1), mx)

    def sums(iscale):
        q = vals[best_index_int8(IQ4NL_VALUES, iscale * xg)]
        wq = w * q
        return seqsum(wq * xg), seqsum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = -mx / vals[0]
        sumqx, sumq2 = sums(F(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F(0))
        best = d * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = sums(F(itry + int(IQ4NL_VALUES[0])) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
        d = np.where(zero, F(0), d)
        idl = np.where(d != 0, F(1) / d, F(0))
    L = best_index_int8(IQ4NL_VALUES, idl * xg).T
    return np.concatenate([_f16(d)[0], _nibbles(L, 16)], axis=1).reshape(R, -1)


# ---- K-quants ---------------------------------------------------------------------------------

def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    X = x.reshape(-1, QK_K)
    B = X.shape[0]
    xg = _groups(X, 16)
    if qw is None:
        sc, mn, L = make_qkx_quants(3, xg, np.abs(xg), -0.5, 0.1, 15, True)
        sc, mn = sc.reshape(B, 16), mn.reshape(B, 16)
        max_sc, max_mn = np.maximum(sc.max(1), F(0)), np.maximum(mn.max(1), F(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = np.where((max_sc > 0)[:, None], rint_clip((F(15) / max_sc)[:, None] * sc, None, None), 0)
            lm = np.where((max_mn > 0)[:, None], rint_clip((F(15) / max_mn)[:, None] * mn, None, None), 0)
        dh, d = _f16(np.where(max_sc > 0, max_sc / F(15), F(0)))
        mh, m = _f16(np.where(max_mn > 0, max_mn / F(15), F(0)))
    else:
        s2 = np.repeat(_sigma2(X, QK_K, 1.0), 16)
        w = _weights(xg, _groups(np.broadcast_to(qw, x.shape), 16), s2)
        sw = seqsum(w)
        sc, mn, L = make_qkx_quants(3, xg, w, -0.9, 0.05, 36, False)
        swg = _groups(sw, 16)
        dm, ls = make_qp_quants(15, _groups(sc, 16), swg)
        mm, lm = make_qp_quants(15, _groups(mn, 16), swg)
        ls, lm = ls.T, lm.T
        dh, d = _f16(dm)
        mh, m = _f16(mm)
    scales = (ls.astype(np.uint8) & 0xFF) | (lm.astype(np.uint8) << 4)
    L = _requant(X.reshape(B, 16, 16), L.T.reshape(B, 16, 16), d[:, None] * (scales & 0xF),
                 m[:, None] * (scales >> 4), 0, 3, 0)
    return np.concatenate([scales, _pack2(L), dh, mh], axis=1).reshape(x.shape[0], -1)


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    X = x.reshape(-1, QK_K)
    B = X.shape[0]
    xg = _groups(X, 16)
    if qw is None:
        sc, L = make_q3_quants(4, xg)
        sc = sc.reshape(B, 16)
        _, max_sc = first_absmax(np.ascontiguousarray(sc.T))
        ok = max_sc != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(ok, F(-32) / np.where(ok, max_sc, F(1)), F(0))
            l = np.where(ok[:, None], rint_clip(iscale[:, None] * sc, -32, 31) + 32, 0)
            dh, d = _f16(np.where(ok, F(1) / iscale, F(0)))
        scales = np.where(ok[:, None], _pack_q3_scales(l), 0).astype(np.uint8)
    else:
        s2 = np.repeat(_sigma2(X, QK_K, 2.0), 16)
        w = _weights(xg, _groups(np.broadcast_to(qw, x.shape), 16), s2)
        sc, L = make_qx_quants(4, xg, w)
        db, l = make_qx_quants(32, _groups(sc, 16), _groups(seqsum(w), 16))
        l = l.T
        scales = _pack_q3_scales(l)
        dh, d = _f16(db)
    sc6 = l.astype(np.int32) - 32  # the stored 6-bit scales, signed (a zero block has d = 0)
    L = _requant(X.reshape(B, 16, 16), L.T.reshape(B, 16, 16), d[:, None] * sc6.astype(F), None, -4, 3, 4)
    L = L.reshape(B, QK_K)
    high = (L > 3).astype(np.uint8)
    hmask = (high.reshape(B, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    L = np.where(high.astype(bool), L - 4, L)
    return np.concatenate([hmask, _pack2(L), scales, dh], axis=1).reshape(x.shape[0], -1)


def _q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> np.ndarray:
    X = x.reshape(-1, QK_K)
    B = X.shape[0]
    xg = _groups(X, 32)
    if qw is None:
        av = np.sqrt(seqsum(xg * xg) / F(32))
        w = av + np.abs(xg)
        sc, mn, L = make_qkx_quants(nmax, xg, w, -1.0 if nmax == 15 else -0.5, 0.1, 20 if nmax == 15 else 15, False)
        sc, mn = sc.reshape(B, 8), mn.reshape(B, 8)
        max_sc, max_mn = np.maximum(sc.max(1), F(0)), np.maximum(mn.max(1), F(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_s = np.where(max_sc > 0, F(63) / max_sc, F(0))
            inv_m = np.where(max_mn > 0, F(63) / max_mn, F(0))
        ls = np.minimum(rint_clip(inv_s[:, None] * sc, None, None) & 0xFF, 63)
        lm = np.minimum(rint_clip(inv_m[:, None] * mn, None, None) & 0xFF, 63)
        dh, d = _f16(max_sc / F(63))
        mh, m = _f16(max_mn / F(63))
    else:
        s2 = _sigma2(X, QK_K, 2.0)
        w = _weights(xg, _groups(np.broadcast_to(qw, x.shape), 32), np.repeat(s2, 8))
        sc, mn, L = make_qkx_quants(nmax, xg, w, -0.9, 0.05, 36, False)
        swg = _groups(seqsum(w), 8)
        db, ls = make_qp_quants(63, _groups(sc, 8), swg)
        mb, lm = make_qp_quants(63, _groups(mn, 8), swg)
        ls, lm = np.minimum(ls.T, 63), np.minimum(lm.T, 63)
        dh, d = _f16(db)
        mh, m = _f16(mb)
    L = _requant(X.reshape(B, 8, 32), L.T.reshape(B, 8, 32), d[:, None] * ls.astype(F),
                 m[:, None] * lm.astype(F), 0, nmax, 0).reshape(B, QK_K)
    parts = [dh, mh, _pack_k4_scales(ls, lm)]
    if nmax == 31:
        hi = (L > 15).astype(np.uint8).reshape(B, 4, 2, 32)
        qh = (hi << (2 * np.arange(4, dtype=np.uint8)[None, :, None, None] + np.arange(2, dtype=np.uint8)[None, None, :, None]))
        parts.append(qh.sum(axis=(1, 2), dtype=np.uint8))
        L = L & 0xF
    parts.append(_nibbles(L, 32))
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    X = x.reshape(-1, QK_K)
    B = X.shape[0]
    xg = _groups(X, 16)
    sc, L = make_qx_quants(32, xg, None if qw is None else _groups(np.broadcast_to(qw, x.shape), 16))
    sc = sc.reshape(B, 16)
    amax, max_sc = first_absmax(np.ascontiguousarray(sc.T))
    ok = amax >= GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F(-128) / np.where(ok, max_sc, F(1))
        dh, d = _f16(np.where(ok, F(1) / iscale, F(0)))
        scales = np.minimum(rint_clip(iscale[:, None] * sc, None, None), 127)
    scales = np.where(ok[:, None], scales, 0).astype(np.int8)
    L = _requant(X.reshape(B, 16, 16), L.T.reshape(B, 16, 16), d[:, None] * scales.astype(F), None, -32, 31, 32)
    L = np.where(ok[:, None, None], L, 0).reshape(B, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([L[:, :, 0] & 0xF | (L[:, :, 2] & 0xF) << 4, L[:, :, 1] & 0xF | (L[:, :, 3] & 0xF) << 4], axis=2)
    qh = L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    return np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64), scales.view(np.uint8), dh], axis=1).reshape(x.shape[0], -1)


def quantize_rows(x: np.ndarray, qtype: T, qw: np.ndarray | None) -> np.ndarray:
    """One chunk of rows; see the module docstring."""
    if qtype == T.Q8_0 or (qw is None and qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)):
        return quants.quantize(x, qtype)  # gguf-py's ports of the _ref functions (tested identical)
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        return _legacy_impl(x, qtype, qw)
    if qtype == T.IQ4_NL:
        return _iq4_nl(x, qw)
    if qtype == T.Q2_K:
        return _q2_k(x, qw)
    if qtype == T.Q3_K:
        return _q3_k(x, qw)
    if qtype in (T.Q4_K, T.Q5_K):
        return _q45_k(x, qw, 15 if qtype == T.Q4_K else 31)
    if qtype == T.Q6_K:
        return _q6_k(x, qw)
    raise ValueError(qtype)
