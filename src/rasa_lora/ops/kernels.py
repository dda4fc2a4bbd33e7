r"""The Triton kernels of the fused RaSA layer (their launches: `triton_backend.py`; shapes: `plans.py`).

Notation: x (M, K) the input rows, g (M, N) the output gradient, A (R, K) and C (N, R) the packed factors
(R: n = r-k+Lk ranks rounded up to a power of two >= 16, zero beyond n; the dropout scale s and D folded into
C), u (M, R) and gu (M, R) the thin float32 intermediates, keep(i, j) the hash mask of `dropout.py`, drawn in
registers where it is used. A training step of a layer runs:

    forward   _down_pack_kernel   pack A and C (one launch), then u = (keep * x) A^T          one read of x
              _up_rows_kernel     y = u C^T (+ c), or y += u C^T            one write (or read and write) of y
    backward  _down_pack_kernel   A and C again (pack programs only), or a recomputation's pack
              _bwd_up_kernel      gu = g C,  dC = g^T u                                        one read of g
              _gx_rows_kernel     dx = keep * (gu A), or dx += ...        one write (or read and write) of dx
              _ga_finalize_kernel dA = gu^T (keep * x); dB = s dC D, dD = s sum_b(dC * B)      one read of x

The split reductions (over K in `down`, over M in `ga` and `bwd_up`) add float32 partial sums atomically, so
their last bits depend on scheduling. Kernels that no committed launch shape ran left this module (tile-a-program
`up`/`gx`, the split `bwd_up`, the fused `bwd_down`): docs/performance.md, record 9.
"""

from __future__ import annotations

try:  # Triton ships with CUDA builds of torch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

# Arguments that change from call to call (the dropout seed's hash and threshold, the dropout scale): the kernels
# are compiled without specializing on their values, and the launch cache leaves them out of its key.
LOOSE = ["seed_h", "thr", "scale"]


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _mix(v):
        v = v ^ (v >> 16)
        v = v * 0x21F0AAAD
        v = v ^ (v >> 15)
        v = v * 0x735A2D97
        return v ^ (v >> 15)

    @triton.jit
    def _seed_hash(seed_h, seed_ptr, SEED_PTR: tl.constexpr):
        """The mask seed's hash: `seed_h` as passed (the host's `dropout.seed_hash`), or with SEED_PTR, the mix of the
        call's seed read from device memory (an int32 at `seed_ptr`, its bits as uint32), so a replayed CUDA graph
        draws the mask of whatever seed the device holds at replay time (`dropout.call_seed_tensor`)."""
        if SEED_PTR:
            hashed = _mix(tl.load(seed_ptr).to(tl.uint32))
        else:
            hashed = seed_h.to(tl.uint32)
        return hashed

    @triton.jit
    def _row_hash(rows, seed_h):
        """The rows' odd hashes (hoisted out of loops over columns)."""
        return _mix(rows.to(tl.uint32) + seed_h.to(tl.uint32)) | 1

    @triton.jit
    def _col_hash(col0, seed_h, BK: tl.constexpr):
        """The odd hashes of the column pairs of columns [col0, col0 + BK) (col0 even)."""
        pairs = (col0 // 2 + tl.arange(0, BK // 2)).to(tl.uint32)
        return _mix((pairs * 0x61C88647) ^ seed_h.to(tl.uint32)) | 1

    @triton.jit
    def _keep_w(hr, hc):
        """Keep words of rows hashed `hr` x column pairs hashed `hc`: their product, xorshifted (`dropout.py`),
        split into the two columns' 16-bit halves (low half: the even column), to compare with the threshold."""
        v = hr[:, None] * hc[None, :]
        v = v ^ (v >> 16)
        return tl.interleave(v & 0xFFFF, v >> 16)

    @triton.jit
    def _keep_h(hr, col0, seed_h, thr, BK: tl.constexpr):
        """Keep decisions of the rows hashed `hr` x columns [col0, col0 + BK) (col0 even)."""
        return _keep_w(hr, _col_hash(col0, seed_h, BK)) >= thr

    @triton.jit
    def _keep(rows, col0, seed_h, thr, BK: tl.constexpr):
        """Keep decisions of rows x columns [col0, col0 + BK) (col0 even)."""
        return _keep_h(_row_hash(rows, seed_h), col0, seed_h, thr, BK)

    @triton.jit
    def _store_or_add(pointers, acc, mask, ATOMIC: tl.constexpr):
        """Write a reduction's result; added atomically when the reduction is split over several programs."""
        if ATOMIC:
            tl.atomic_add(pointers, acc, mask=mask, sem="relaxed")
        else:
            tl.store(pointers, acc, mask=mask)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _pack_a_row(ap_ptr, as_ptr, a_ptr, row, K, NP, NS, BK: tl.constexpr):
        """Row `row` of A = [A_p; A_s; 0], cast to A's dtype."""
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            vp = tl.load(ap_ptr + row * K + rk, mask=(rk < K) & (row < NP), other=0.0).to(tl.float32)
            vs = tl.load(as_ptr + (row - NP) * K + rk, mask=(rk < K) & (row >= NP) & (row < NP + NS),
                         other=0.0).to(tl.float32)
            tl.store(a_ptr + row * K + rk, (vp + vs).to(a_ptr.dtype.element_ty), mask=rk < K)

    @triton.jit
    def _pack_c_block(bp_ptr, bs_ptr, d_ptr, c_ptr, block, N, NP, NS, scale, R: tl.constexpr, BN: tl.constexpr):
        """Rows [block * BN, block * BN + BN) of C = s [B_p D_p, B_s D_s, 0]."""
        rn = block * BN + tl.arange(0, BN)
        rr = tl.arange(0, R)
        d = tl.load(d_ptr + rr, mask=rr < NP + NS, other=0.0).to(tl.float32)
        row_ok = (rn < N)[:, None]
        bp = tl.load(bp_ptr + rn[:, None] * NP + rr[None, :], mask=row_ok & (rr < NP)[None, :], other=0.0)
        bs = tl.load(bs_ptr + rn[:, None] * NS + (rr - NP)[None, :],
                     mask=row_ok & ((rr >= NP) & (rr < NP + NS))[None, :], other=0.0)
        c = (bp.to(tl.float32) + bs.to(tl.float32)) * d[None, :] * scale
        tl.store(c_ptr + rn[:, None] * R + rr[None, :], c.to(c_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit(do_not_specialize=LOOSE)
    def _down_pack_kernel(x_ptr, ap_ptr, as_ptr, bp_ptr, bs_ptr, d_ptr, a_ptr, c_ptr, u_ptr, M, K, N, NP, NS,
                          sxm, seed_h, seed_ptr, thr, k_per_split, scale, row_blocks, splits,
                          R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BK_PACK: tl.constexpr,
                          BN_PACK: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
                          PACKED: tl.constexpr, SEED_PTR: tl.constexpr):
        """u = (keep * x) A^T in the first `row_blocks * splits` programs, reading the raw factors (or, with
        PACKED, the packed A made by an earlier launch), and the packed A and C in R + cdiv(N, BN_PACK) more
        programs (none when the grid stops short of them; only those with `row_blocks = 0`). Programs past those
        zero rows of u, BN_PACK each (a pack-only launch before the rows' launch that adds into u)."""
        pid = tl.program_id(0)
        computing = row_blocks * splits
        if pid < computing:
            rm = (pid % row_blocks) * BM + tl.arange(0, BM)
            rr = tl.arange(0, R)
            k_lo = (pid // row_blocks) * k_per_split
            acc = tl.zeros((BM, R), dtype=tl.float32)
            private = (rr < NP)[:, None]
            shared = ((rr >= NP) & (rr < NP + NS))[:, None]
            if DROPOUT:
                hs = _seed_hash(seed_h, seed_ptr, SEED_PTR)
                hr = _row_hash(rm, hs)
            for k0 in range(k_lo, k_lo + k_per_split, BK):
                rk = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                            other=0.0)
                if DROPOUT:
                    x = tl.where(_keep_h(hr, k0, hs, thr, BK), x, 0.0)
                in_k = (rk < K)[None, :]
                if PACKED:
                    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=in_k, other=0.0)
                else:
                    a = tl.load(ap_ptr + rr[:, None] * K + rk[None, :], mask=private & in_k, other=0.0)
                    a += tl.load(as_ptr + (rr - NP)[:, None] * K + rk[None, :], mask=shared & in_k, other=0.0)
                acc += _dot(x, tl.trans(a.to(x.dtype)), IEEE)
            pointers = u_ptr + rm[:, None] * R + rr[None, :]
            _store_or_add(pointers, acc, (rm < M)[:, None], ATOMIC)
        elif pid < computing + R:
            _pack_a_row(ap_ptr, as_ptr, a_ptr, pid - computing, K, NP, NS, BK_PACK)
        elif pid < computing + R + tl.cdiv(N, BN_PACK):
            _pack_c_block(bp_ptr, bs_ptr, d_ptr, c_ptr, pid - computing - R, N, NP, NS, scale, R, BN_PACK)
        else:
            rm = (pid - computing - R - tl.cdiv(N, BN_PACK)) * BN_PACK + tl.arange(0, BN_PACK)
            rr = tl.arange(0, R)
            tl.store(u_ptr + rm[:, None] * R + rr[None, :], tl.zeros((BN_PACK, R), dtype=tl.float32),
                     mask=(rm < M)[:, None])

    @triton.jit
    def _store_ga(gap_ptr, gas_ptr, acc, rr, rk, K, NP, NS, ATOMIC: tl.constexpr):
        """Rows of dA = [dA_p; dA_s; unused] (R, BK tile at columns rk) into dA_p (NP, K) and dA_s (NS, K)."""
        in_k = (rk < K)[None, :]
        _store_or_add(gap_ptr + rr[:, None] * K + rk[None, :], acc, in_k & (rr < NP)[:, None], ATOMIC)
        _store_or_add(gas_ptr + (rr - NP)[:, None] * K + rk[None, :], acc,
                      in_k & ((rr >= NP) & (rr < NP + NS))[:, None], ATOMIC)

    @triton.jit
    def _write_or_add(pointers, update, mask, ACCUMULATE: tl.constexpr):
        """Store a float32 tile into a token-sized tensor (its dtype), or add it to what is there."""
        if ACCUMULATE:
            update += tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
        tl.store(pointers, update.to(pointers.dtype.element_ty), mask=mask)

    @triton.jit
    def _up_rows_kernel(u_ptr, c_ptr, y_ptr, bias_ptr, M, N, sym, n_per_split, R: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, ACCUMULATE: tl.constexpr, BIAS: tl.constexpr, IEEE: tl.constexpr):
        """y = u C^T (+ c), or y += ..., each program owning BM rows: u's rows are read once, and the program walks
        its `n_per_split` output columns BN at a time, streaming C's rows (L2-resident) and writing y."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        u = u.to(c_ptr.dtype.element_ty)
        n_lo = tl.program_id(1) * n_per_split
        for n0 in range(n_lo, tl.minimum(n_lo + n_per_split, N), BN):
            rn = n0 + tl.arange(0, BN)
            c = tl.load(c_ptr + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None], other=0.0)
            update = _dot(u, tl.trans(c), IEEE)
            if BIAS:
                update += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            inside = (rm < M)[:, None] & (rn < N)[None, :]
            _write_or_add(y_ptr + rm[:, None] * sym + rn[None, :], update, inside, ACCUMULATE)

    @triton.jit(do_not_specialize=LOOSE)
    def _gx_rows_kernel(gu_ptr, a_ptr, gx_ptr, gu16_ptr, M, K, sgxm, seed_h, seed_ptr, thr, k_per_split,
                        R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DROPOUT: tl.constexpr,
                        ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, GU16: tl.constexpr, SEED_PTR: tl.constexpr):
        """dL/dx = keep * (gu A), or dL/dx += ..., each program owning BM rows: gu's rows read (and the rows' half
        of the mask's hash computed) once, A's rows streamed (L2-resident), dL/dx written BK columns at a time.
        With GU16, the first program of each row block also writes its rows of gu in A's dtype (for
        `_ga_finalize_kernel`, which would otherwise re-read float32 gu once per column block)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        gu = tl.load(gu_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        gu = gu.to(a_ptr.dtype.element_ty)
        if GU16:
            if tl.program_id(1) == 0:
                tl.store(gu16_ptr + rm[:, None] * R + rr[None, :], gu, mask=(rm < M)[:, None])
        if DROPOUT:
            hs = _seed_hash(seed_h, seed_ptr, SEED_PTR)
            hr = _row_hash(rm, hs)
        k_lo = tl.program_id(1) * k_per_split
        for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0)
            update = _dot(gu, a, IEEE)
            if DROPOUT:
                update = tl.where(_keep_h(hr, k0, hs, thr, BK), update, 0.0)
            inside = (rm < M)[:, None] & (rk < K)[None, :]
            _write_or_add(gx_ptr + rm[:, None] * sgxm + rk[None, :], update, inside, ACCUMULATE)

    @triton.jit
    def _bwd_up_kernel(g_ptr, c_ptr, u_ptr, gu_ptr, gc_ptr, M, N, sgm, n_per_split, RU,
                       R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ATOMIC: tl.constexpr,
                       IEEE: tl.constexpr):
        """gu (+)= g C over the program's rows and a split of the columns; dC += g^T u tile by tile. Only the
        first RU of the R packed ranks are stored or added: the others are zero padding (gu and dC come zeroed)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, R)
        used = (rr < RU)[None, :]
        u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
        u = u.to(g_ptr.dtype.element_ty)
        acc = tl.zeros((BM, R), dtype=tl.float32)
        n_lo = tl.program_id(1) * n_per_split
        for n0 in range(n_lo, n_lo + n_per_split, BN):
            rn = n0 + tl.arange(0, BN)
            g = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :], mask=(rm < M)[:, None] & (rn < N)[None, :],
                        other=0.0)
            c = tl.load(c_ptr + rn[:, None] * R + rr[None, :], mask=(rn < N)[:, None], other=0.0)
            acc += _dot(g, c, IEEE)
            tl.atomic_add(gc_ptr + rn[:, None] * R + rr[None, :], _dot(tl.trans(g), u, IEEE),
                          mask=(rn < N)[:, None] & used, sem="relaxed")
        pointers = gu_ptr + rm[:, None] * R + rr[None, :]
        _store_or_add(pointers, acc, (rm < M)[:, None] & used, ATOMIC)

    @triton.jit
    def _finalize_block(gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr, block, N, NP, NS, scale,
                        R: tl.constexpr, BN: tl.constexpr):
        """dB = s dC D and dD += s sum_b(dC * B) for rows [block * BN, block * BN + BN) of dC."""
        rn = block * BN + tl.arange(0, BN)
        rr = tl.arange(0, R)
        row_ok = (rn < N)[:, None]
        private = row_ok & (rr < NP)[None, :]
        shared = row_ok & ((rr >= NP) & (rr < NP + NS))[None, :]
        gc = tl.load(gc_ptr + rn[:, None] * R + rr[None, :], mask=row_ok, other=0.0) * scale
        d = tl.load(d_ptr + rr, mask=rr < NP + NS, other=0.0).to(tl.float32)
        gb = gc * d[None, :]
        tl.store(gbp_ptr + rn[:, None] * NP + rr[None, :], gb, mask=private)
        tl.store(gbs_ptr + rn[:, None] * NS + (rr - NP)[None, :], gb, mask=shared)
        bp = tl.load(bp_ptr + rn[:, None] * NP + rr[None, :], mask=private, other=0.0).to(tl.float32)
        bs = tl.load(bs_ptr + rn[:, None] * NS + (rr - NP)[None, :], mask=shared, other=0.0).to(tl.float32)
        tl.atomic_add(gd_ptr + rr, tl.sum(gc * (bp + bs), axis=0), mask=rr < NP + NS, sem="relaxed")

    @triton.jit(do_not_specialize=LOOSE)
    def _ga_finalize_kernel(x_ptr, gu_ptr, gap_ptr, gas_ptr, gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr,
                            M, K, N, NP, NS, sxm, seed_h, seed_ptr, thr, m_per_split, scale, k_blocks, splits,
                            R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN_FIN: tl.constexpr,
                            DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr, SEED_PTR: tl.constexpr):
        """The backward's last launch: dA = gu^T (keep * x) and, in extra programs, dB and dD from the complete
        dC (written by the earlier `bwd_up` launch)."""
        pid = tl.program_id(0)
        computing = k_blocks * splits
        if pid < computing:
            col0 = (pid % k_blocks) * BK
            rk = col0 + tl.arange(0, BK)
            rr = tl.arange(0, R)
            acc = tl.zeros((R, BK), dtype=tl.float32)
            m_lo = (pid // k_blocks) * m_per_split
            if DROPOUT:
                hs = _seed_hash(seed_h, seed_ptr, SEED_PTR)
                hc = _col_hash(col0, hs, BK)  # the program's columns: hashed once
            for m0 in range(m_lo, m_lo + m_per_split, BM):
                rm = m0 + tl.arange(0, BM)
                x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :],
                            other=0.0)
                if DROPOUT:
                    x = tl.where(_keep_w(_row_hash(rm, hs), hc) >= thr, x, 0.0)
                gu = tl.load(gu_ptr + rm[:, None] * R + rr[None, :], mask=(rm < M)[:, None], other=0.0)
                acc += _dot(tl.trans(gu.to(x.dtype)), x, IEEE)
            _store_ga(gap_ptr, gas_ptr, acc, rr, rk, K, NP, NS, ATOMIC)
        else:
            _finalize_block(gc_ptr, bp_ptr, bs_ptr, d_ptr, gbp_ptr, gbs_ptr, gd_ptr, pid - computing, N, NP, NS,
                            scale, R, BN_FIN)


    @triton.jit(do_not_specialize=LOOSE)
    def _keep_mask_kernel(out_ptr, M, K, seed_h, seed_ptr, thr, BM: tl.constexpr, BK: tl.constexpr,
                          SEED_PTR: tl.constexpr):
        hs = _seed_hash(seed_h, seed_ptr, SEED_PTR)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        keep = _keep(rm, tl.program_id(1) * BK, hs, thr, BK)
        tl.store(out_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.int8),
                 mask=(rm < M)[:, None] & (rk < K)[None, :])
