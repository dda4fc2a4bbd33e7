r"""Triton kernels that apply the adapter's input dropout inside the thin products, never storing a mask.

With dropout on the adapter input, the plain path draws a bool mask (a pass writing M x a), multiplies it
into x (another pass) in forward, in the recomputed forward and again in backward, and multiplies the
input gradient by it. These kernels draw the keep decision from Philox counters inside the product instead
(`keep = rand(seed, row * a + col) >= p`), so each pass over x or dL/dx does all the work at once:

    dropout_matmul:  u       = (keep * x) A^T          (M x n)   one read of x
    grad_a:          dL/dA   = gu^T (keep * x)         (n x a)   one read of x; split over M, fp32 atomics
    grad_x_:         dL/dx  += scale * keep * (gu A)   in place: one read and write of dL/dx

Limits: CUDA (or Triton's interpreter, for tests); M * a < 2**31 (32-bit Philox offsets); the float32 sums
of `grad_a` use atomics, so its last bits depend on scheduling (not bitwise reproducible on the GPU).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

MAX_OFFSET = 2**31


def available() -> bool:
    return triton is not None


def _block_n(n: int) -> int:
    return max(16, min(64, triton.next_power_of_2(n)))


if triton is not None:

    @triton.jit
    def _keep(seed, rows, cols, K, p):
        return tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p

    @triton.jit
    def _dropout_matmul_kernel(x_ptr, a_ptr, u_ptr, M, K, N, sxm, sxk, san, sak, sum_, sun, seed, p,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               IEEE: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            x = tl.where(_keep(seed, rm, rk, K, p), x, tl.zeros_like(x))
            a = tl.load(a_ptr + rn[None, :] * san + rk[:, None] * sak,
                        mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
            if IEEE:
                acc += tl.dot(x, a, input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        tl.store(u_ptr + rm[:, None] * sum_ + rn[None, :] * sun, acc.to(u_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _grad_a_kernel(g_ptr, x_ptr, out_ptr, M, K, N, sgm, sgn, sxm, sxk, son, sok, seed, p, rows_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        start = tl.program_id(1) * rows_per_split
        rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, rows_per_split, BLOCK_M):
            rm = start + m0 + tl.arange(0, BLOCK_M)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            x = tl.where(_keep(seed, rm, rk, K, p), x, tl.zeros_like(x))
            g = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :] * sgn,
                        mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(g), x, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(g), x)
        tl.atomic_add(out_ptr + rn[:, None] * son + rk[None, :] * sok, acc,
                      mask=(rn[:, None] < N) & (rk[None, :] < K))

    @triton.jit
    def _grad_x_kernel(g_ptr, a_ptr, gx_ptr, M, K, N, sgm, sgn, san, sak, sxm, sxk, seed, p, scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :] * sgn,
                        mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            a = tl.load(a_ptr + rn[:, None] * san + rk[None, :] * sak,
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(g, a, input_precision="ieee")
            else:
                acc += tl.dot(g, a)
        acc = tl.where(_keep(seed, rm, rk, K, p), acc * scale, 0.0)
        inside = (rm[:, None] < M) & (rk[None, :] < K)
        pointers = gx_ptr + rm[:, None] * sxm + rk[None, :] * sxk
        gx = tl.load(pointers, mask=inside, other=0.0)
        tl.store(pointers, (gx.to(tl.float32) + acc).to(gx_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _keep_mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        keep = _keep(seed, rm, rk, K, p)
        tl.store(out_ptr + rm[:, None] * K + rk[None, :], keep.to(tl.int8),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))


def dropout_matmul(x: torch.Tensor, A: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """(keep * x) A^T for x (M, a), A (n, a); returns (M, n) in x's dtype."""
    M, K = x.shape
    N = A.shape[0]
    u = torch.empty((M, N), dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, BLOCK_K = 64, _block_n(N), 64
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _dropout_matmul_kernel[grid](x, A, u, M, K, N, *x.stride(), *A.stride(), *u.stride(), seed, p,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=x.dtype == torch.float32)
    return u


def grad_a(g: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """g^T (keep * x) for g (M, n), x (M, a); returns (n, a) float32."""
    M, K = x.shape
    N = g.shape[1]
    out = torch.zeros((N, K), dtype=torch.float32, device=x.device)
    BLOCK_M, BLOCK_N, BLOCK_K = 64, _block_n(N), 64
    splits = max(1, min(triton.cdiv(M, BLOCK_M), 512 // max(1, triton.cdiv(K, BLOCK_K))))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BLOCK_M) * BLOCK_M
    grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(M, rows_per_split), triton.cdiv(N, BLOCK_N))
    _grad_a_kernel[grid](g, x, out, M, K, N, *g.stride(), *x.stride(), *out.stride(), seed, p, rows_per_split,
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=x.dtype == torch.float32)
    return out


def grad_x_(grad_x: torch.Tensor, g: torch.Tensor, A: torch.Tensor, seed: int, p: float, scale: float) -> None:
    """grad_x += scale * keep * (g A) in place, for grad_x (M, a), g (M, n), A (n, a)."""
    M, K = grad_x.shape
    N = g.shape[1]
    BLOCK_M, BLOCK_N, BLOCK_K = 64, _block_n(N), 64
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))
    _grad_x_kernel[grid](g, A, grad_x, M, K, N, *g.stride(), *A.stride(), *grad_x.stride(), seed, p, scale,
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=grad_x.dtype == torch.float32)


def keep_mask(M: int, K: int, seed: int, p: float, device) -> torch.Tensor:
    """The keep decisions the kernels above make, as a bool (M, K) tensor (for tests)."""
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    grid = (triton.cdiv(M, 64), triton.cdiv(K, 64))
    _keep_mask_kernel[grid](out, M, K, seed, p, BLOCK_M=64, BLOCK_K=64)
    return out.bool()
