"""Reconstruction error of LoRA and RaSA on a set of matrices {M_i} (paper Sec. 3 and App. A).

The problem, for one module type (a *group*) of L layers, each M_i of shape (b, a):

    e_lora      = min  sum_i ||M_i - B_i A_i||_F^2                  B_i (b, r), A_i (r, a)        (eq. 7)
                = sum_i sum_{j>r} sigma_j(M_i)^2                                                   (eq. 9)
    e_rasa(k)   = min  sum_i ||M_i - (B~_i A~_i + B_S D_i A_S)||_F^2                               (eq. 11, 17)
                  B~_i (b, r-k), A~_i (r-k, a), B_S (b, L*k), A_S (L*k, a), D_i = diag(d_i), d_i (L*k,)

Eq. 11 puts D_i on the shared part only; the trained adapter (eq. 5) puts D_i over both parts. They are the
same model: `RasaFactors.adapter_D()` maps a fit to the adapter with D_i = [ones(r-k), d_i] (the private
scale stays inside B~_i = U S^1/2 and A~_i = S^1/2 V^T, as eq. 19 writes them).

What is here
- `lora_solution`: LoRA's optimum (eq. 7-9): exact (full SVD) or fast (block subspace iteration run until
  the captured energy changes by less than `tol`, relative). The fast e_lora is an upper bound on the exact
  one; its gap is at most about `tol` times the captured energy once converged (`LoraSolution.tol_reached`).
- `theorem_factors`: the construction in the proof of Theorem 3.1 (eq. 12-15); its error equals e_lora.
- `fit_rasa`: coordinate descent exactly as App. A, one iteration = eq. 18-19 (private factors, per layer),
  eq. 24 (B_S), eq. 25 (A_S), eq. 26 (all D_i); the error (eq. 17) is recorded after every iteration.
  Two variants:
  * ``"exact"``: the reference. A loop over layers that forms each residual and takes its full SVD.
  * ``"fast"``: the layers of a group batched as one (L, b, a) tensor (on the GPU when M is there); the
    private update is a block subspace iteration for the top r-k triplets only, warm-started from the
    previous iteration's singular vectors, with `oversample` random columns; all other updates are products
    of M with thin matrices (4 passes over M per iteration when one subspace round suffices). The previous
    left singular vectors are kept inside the search space, so the private update can never raise the error
    (the same guarantee as the exact step). Tests hold the fast final error within 1e-3 (relative) of the
    exact one. Stated accuracy: a private step stops refining when sum_j ||R_i v_j - s_j u_j||^2, an estimate
    of the energy its subspace misses, is below `svd_tol` (default 3e-5) times the layer's error, or after
    `power_iters` extra rounds; `FitResult.svd_estimate` reports that ratio for the last step.
- Starts (`init=`): ``"stacked"`` (from the data: B_S and A_S the leading L*k singular vectors of the deltas
  side by side [M_1 ... M_L] and on top of each other [M_1; ...; M_L], d_i by eq. 26, private parts from the
  first iteration; `stacked_factors`), ``"theorem"`` (eq. 12-15, so the curve starts at e_lora and, descent
  being monotone, never ends above it), ``"random"`` (as the adapter starts: A_S Gaussian with std 1/sqrt(a),
  B_S = 0, d_i = 1, no private part) and ``"auto"`` (the default: all three, the lowest final error kept).
  The paper does not say which it used; its Figure 2 curves start above e_lora, as "random" does.
- Stopping (`tol`, `window`, `iters`): each start runs until its error fell by less than window * tol
  (relative) over the last `window` iterations, or `iters` iterations ran; `FitResult.converged` says which.
  `restarts` = N adds N - 1 "random" starts; `FitResult.starts` lists every start's outcome, the best is kept.
- Numerics: every Gram system is solved (Cholesky), never inverted; a singular or badly conditioned Gram
  matrix (a dead shared rank, L*k > min(a, b)) falls back to the eigen-decomposition pseudo-inverse, which
  still gives a minimiser, and is counted in `FitResult.gram_fallbacks`. After every iteration each shared
  rank is rescaled so that its column of B_S and row of A_S have unit norm, the scale going into D (this
  leaves the error and every later iterate's product unchanged; it only keeps the Gram matrices well scaled).
  `dtype` picks float32 or float64 (default: float64 for "exact", the input's float type for "fast").

Limits: the fast error curve is computed from thin products by expanding the square, so in float32 its
values carry a rounding error of about 1e-7 * sum ||M_i||^2; `FitResult.final_error` is recomputed directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rasa_lora.analysis.defaults import (  # noqa: F401 (re-exported for existing callers)
    DEFAULT_INIT,
    DEFAULT_MAX_ITERS,
    DEFAULT_TOL,
    DEFAULT_WINDOW,
    INITS,
)

VARIANTS = ("fast", "exact")


@dataclass
class RasaFactors:
    """A RaSA solution for one group: dW_i = B~_i A~_i + B_S diag(d_i) A_S (eq. 11)."""

    private_B: Tensor  # (L, b, r-k)
    private_A: Tensor  # (L, r-k, a)
    shared_B: Tensor  # (b, L*k)
    shared_A: Tensor  # (L*k, a)
    shared_D: Tensor  # (L, L*k)

    def reconstruct(self) -> Tensor:
        """All L reconstructions, (L, b, a)."""
        shared = self.shared_B @ (self.shared_D[:, :, None] * self.shared_A)
        return self.private_B @ self.private_A + shared

    def adapter_D(self) -> Tensor:
        """D_i of the adapter (eq. 5), (L, r-k + L*k): ones on the private ranks, then the fitted d_i."""
        ones = torch.ones(self.private_A.shape[:2], dtype=self.shared_D.dtype, device=self.shared_D.device)
        return torch.cat([ones, self.shared_D], dim=1)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> RasaFactors:
        return RasaFactors(*(t.to(dtype=dtype, device=device) for t in
                             (self.private_B, self.private_A, self.shared_B, self.shared_A, self.shared_D)))


@dataclass
class LoraSolution:
    """LoRA's optimum for one group: the top-r singular triplets of every M_i (eq. 8-9)."""

    U: Tensor  # (L, b, r)
    S: Tensor  # (L, r), descending
    V: Tensor  # (L, a, r)
    energy: Tensor  # (L,) ||M_i||_F^2, float64
    tol_reached: float = 0.0  # estimated missed energy / e_lora of the worst layer (0 for the exact SVD)

    @property
    def error(self) -> float:
        """e_lora (eq. 9) = sum_i (||M_i||^2 - sum_{j<=r} sigma_j^2)."""
        return float((self.energy - self.S.double().square().sum(1)).clamp_min(0).sum())


@dataclass
class FitResult:
    """Outcome of `fit_rasa` for one group; errors are absolute (eq. 17), divide by `total_energy` for relative."""

    factors: RasaFactors
    lora_error: float
    total_energy: float
    initial_error: float
    error_curve: list[float] = field(default_factory=list)
    final_error: float = math.nan
    wall_time_s: float = 0.0
    gram_fallbacks: int = 0
    svd_estimate: float = 0.0  # estimated relative error loss of the last fast private step (`_block_svd`)
    passes: int = 0  # products of the whole (L, b, a) stack with a thin matrix (fast variant)
    iterations: int = 0  # iterations run (stops early once the relative decrease is below `tol`)
    converged: bool = False  # stopped by the criterion (not by the maximum)
    tol: float = 0.0
    init: str = ""  # the start this result comes from
    seed: int = 0
    starts: list[dict] = field(default_factory=list)  # per start: init, seed, final_error, iterations, converged,
    # initial_error, error_curve

    @property
    def start_spread(self) -> float:
        """(worst - best) / best final error over `starts` (0 for a single start)."""
        errors = [s["final_error"] for s in self.starts] or [self.final_error]
        return (max(errors) - min(errors)) / min(errors) if min(errors) > 0 else 0.0


# ----------------------------------------------------------------------------------------------- checks


def check_group(M: Tensor | Sequence[Tensor], r: int, k: int) -> Tensor:
    """Stack and validate a group: non-empty, equal 2-D shapes, finite, 0 <= k <= r <= min(b, a)."""
    if not isinstance(M, Tensor):
        if len(M) == 0:
            raise ValueError("The group is empty: it needs at least one matrix M_i (one layer).")
        shapes = {tuple(m.shape) for m in M}
        if len(shapes) != 1:
            raise ValueError(f"The matrices of one group must share one shape; got {sorted(shapes)}. "
                             "Group only layers of the same module type.")
        M = torch.stack(list(M))
    if M.ndim != 3 or M.shape[0] == 0:
        raise ValueError(f"Expected a non-empty (L, b, a) stack of matrices; got shape {tuple(M.shape)}.")
    if not M.is_floating_point():
        raise TypeError(f"Expected floating-point matrices; got dtype {M.dtype}.")
    if not isinstance(r, int) or not isinstance(k, int) or r < 1 or not 0 <= k <= r:
        raise ValueError(f"r={r}, k={k} is invalid: choose integers with r >= 1 and 0 <= k <= r.")
    if r > min(M.shape[1:]):
        raise ValueError(f"r={r} is larger than min(b, a)={min(M.shape[1:])} for shape {tuple(M.shape[1:])}; "
                         "choose a smaller r.")
    bad = ~torch.isfinite(M).flatten(1).all(1)
    if bad.any():
        layers = bad.nonzero().flatten().tolist()
        raise ValueError(f"The matrices of layers {layers} contain NaN or infinite values; "
                         "check the checkpoints (a diverged fine-tune, a failed load).")
    return M


# ---------------------------------------------------------------------------------------- linear algebra


def solve_psd(gram: Tensor, rhs: Tensor) -> tuple[Tensor, bool]:
    """Solve gram @ X = rhs for a symmetric PSD `gram` (n, n); returns (X, used_fallback).

    Cholesky when `gram` is well conditioned for its dtype; otherwise the eigen-decomposition pseudo-inverse
    (eigenvalues below n * eps * max dropped), which returns the minimum-norm least-squares minimiser.
    """
    n = gram.shape[-1]
    if n == 0:
        return rhs.clone(), False
    eps = torch.finfo(gram.dtype).eps
    chol, info = torch.linalg.cholesky_ex(gram)
    diag = chol.diagonal()
    if int(info) == 0 and diag.min() > 0 and (diag.min() / diag.max()) ** 2 > 100 * n * eps:
        return torch.cholesky_solve(rhs, chol), False
    values, vectors = torch.linalg.eigh(gram)
    keep = values > n * eps * values.abs().max().clamp_min(torch.finfo(gram.dtype).tiny)
    inverse_values = torch.where(keep, 1 / torch.where(keep, values, 1), 0)
    return vectors @ (inverse_values[:, None] * (vectors.T @ rhs)), True


def energy_per_layer(M: Tensor) -> Tensor:
    """||M_i||_F^2 for every layer, in float64, one layer at a time (no float64 copy of the whole stack)."""
    return torch.stack([torch.linalg.vector_norm(m, dtype=torch.float64).square() for m in M])


def _orth(Y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of each Y[l] (L, n, w), through the eigen-decomposition of the small
    Gram matrix, in float64 and twice over (a CholeskyQR2-like scheme).

    Much faster than Householder QR for tall thin batches on the CPU (docs/performance.md, record 14). Working
    in float64 keeps directions down to about 10 * w * eps(Y.dtype) of the largest
    singular value, so float32 inputs lose nothing a float32 QR would keep; weaker directions are dropped
    (zero columns), which only narrows the search space.
    """
    X = Y.double()
    X = X / X.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    floor = (10 * Y.shape[-1] * torch.finfo(Y.dtype).eps) ** 2
    for _ in range(2):
        values, vectors = torch.linalg.eigh(X.mT @ X)
        scale = torch.where(values > values[..., -1:] * floor, values.clamp_min(1e-300).rsqrt(), 0)
        X = X @ (vectors * scale[..., None, :])
    return X.to(Y.dtype)


def _ritz(Z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Singular triplets of Z^T (L, w, a), Z = R^T Q, in descending order: (W (L, w, w), S (L, w), V (L, a, w)).

    Through the eigen-decomposition of the small Gram Z^T Z, in float64: the leading triplets, the ones used,
    keep full accuracy; the trailing ones only widen the next search block.
    """
    Z64 = Z.double()
    values, vectors = torch.linalg.eigh(Z64.mT @ Z64)
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    S = values.sqrt()
    inverse = torch.where(S > S[..., :1] * 1e-12, 1 / S.clamp_min(1e-300), 0)
    return vectors.to(Z.dtype), S.to(Z.dtype), (Z64 @ (vectors * inverse[..., None, :])).to(Z.dtype)


def _block_svd(apply: Callable[[Tensor], Tensor], apply_t: Callable[[Tensor], Tensor], Y: Tensor, keep: Tensor,
               rank: int, residual_energy: Tensor, tol: float, rounds: int) -> tuple[Tensor, ...]:
    """Top `rank` singular triplets of an operator R (apply(X) = R X, apply_t(Y) = R^T Y), batched over layers.

    Rayleigh-Ritz on span([Y, keep]) (Y = R Omega, the start block), then block power rounds. After each round
    the residuals rho_j = ||R v_j - s_j u_j|| are measured (the product R V is also the next round's block),
    and the loop stops when sum_j rho_j^2 <= tol * (||R_i||^2 - sum_j s_j^2) for every layer: sum_j rho_j^2
    estimates the energy the computed subspace misses, so `tol` is the accepted relative loss in the error.
    Returns (U, S, V, estimate, passes).
    """
    passes, estimate = 0, math.inf
    for _ in range(rounds):
        Q = _orth(torch.cat([Y, keep], -1))
        W, S_all, V_all = _ritz(apply_t(Q))
        V_all = V_all[..., :Y.shape[-1]]
        Y = apply(V_all)
        passes += 2
        U, S = Q @ W[..., :rank], S_all[:, :rank]
        missed = (Y[..., :rank] - U * S[:, None, :]).square().sum(1).double().sum(1)
        error = (residual_energy - S.double().square().sum(1)).clamp_min(1e-300)
        estimate = float((missed / error).max())
        if estimate <= tol:
            break
    return U, S, V_all[..., :rank], estimate, passes


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _randn(shape: tuple[int, ...], like: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)


# -------------------------------------------------------------------------------------------------- LoRA


def lora_solution(M: Tensor, r: int, variant: str = "exact", tol: float = 3e-5, max_passes: int = 40,
                  oversample: int = 8, seed: int = 0) -> LoraSolution:
    """LoRA's optimal factors and error (eq. 7-9) for a stack M (L, b, a).

    ``"exact"`` takes the full SVD of every M_i; ``"fast"`` runs a block subspace iteration of width
    r + oversample from a random start (`_block_svd`) until the estimated energy it misses is below `tol`
    times e_lora for every layer, or after `max_passes` products of M with a thin matrix.
    """
    _check_variant(variant)
    M = check_group(M, r, 0)
    energy = energy_per_layer(M)
    if variant == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return LoraSolution(U[..., :r], S[..., :r], Vh[..., :r, :].mT, energy)
    width = min(r + oversample, *M.shape[1:])
    omega = _randn((M.shape[0], M.shape[2], width), M, _generator(M.device, seed))
    U, S, V, estimate, _ = _block_svd(lambda X: M @ X, lambda Y: (Y.mT @ M).mT, M @ omega, M.new_zeros(*M.shape[:2], 0),
                                      r, energy, tol, max(1, max_passes // 2))
    return LoraSolution(U, S, V, energy, estimate)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; choose one of {VARIANTS}.")


# ----------------------------------------------------------------------------------------- Theorem 3.1


def theorem_factors(lora: LoraSolution, k: int) -> RasaFactors:
    """The feasible RaSA solution of Theorem 3.1's proof (eq. 12-15), built from LoRA's top-r triplets.

    Private: the first r-k triplets of each layer, B~_i = U S^1/2, A~_i = S^1/2 V^T (eq. 15, split as eq. 19).
    Shared: B_S = [U^(1) ... U^(L)], A_S = [V^(1) ... V^(L)]^T with the last k triplets of each layer (eq. 12-13),
    and D_i holding Sigma^(i) in layer i's block, zeros elsewhere (eq. 14). Its error equals e_lora.
    """
    L, r = lora.S.shape
    if not 0 <= k <= r:
        raise ValueError(f"k={k} is invalid for r={r}; choose 0 <= k <= r.")
    p = r - k
    root = lora.S[:, :p].sqrt()
    shared_B = lora.U[..., p:].permute(1, 0, 2).reshape(lora.U.shape[1], L * k)
    shared_A = lora.V[..., p:].permute(0, 2, 1).reshape(L * k, lora.V.shape[1])
    shared_D = torch.zeros(L, L * k, dtype=lora.S.dtype, device=lora.S.device)
    for i in range(L):
        shared_D[i, i * k:(i + 1) * k] = lora.S[i, p:]
    return RasaFactors(lora.U[..., :p] * root[:, None, :], root[:, :, None] * lora.V[..., :p].mT,
                       shared_B, shared_A, shared_D)


def random_factors(M: Tensor, r: int, k: int, seed: int = 0) -> RasaFactors:
    """The ``"random"`` start: A_S ~ N(0, 1/a), B_S = 0, d_i = 1, private factors zero.

    A_S is drawn in float64 on the CPU, so one seed gives the same start in every dtype and on every device.
    """
    L, b, a = M.shape
    shared_A = torch.randn((L * k, a), generator=_generator(torch.device("cpu"), seed), dtype=torch.float64)
    zeros = M.new_zeros
    return RasaFactors(zeros(L, b, r - k), zeros(L, r - k, a), zeros(b, L * k),
                       shared_A.to(M) / math.sqrt(a), M.new_ones(L, L * k))


def _top_eigvecs(gram: Tensor, n: int) -> Tensor:
    """The n leading eigenvectors of a symmetric PSD matrix (columns, descending), in float64."""
    values, vectors = torch.linalg.eigh(gram.double())
    return vectors.flip(-1)[:, :n]


def stacked_pool(M: Tensor, n: int, variant: str = "exact", seed: int = 0, tol: float = 1e-6,
                 rounds: int = 20) -> tuple[Tensor, Tensor, int]:
    """(B_S (b, n), A_S (n, a), passes): the n leading left singular vectors of [M_1 ... M_L] (b, L*a) and the n
    leading right singular vectors of [M_1; ...; M_L] (L*b, a), i.e. of sum_i M_i M_i^T and sum_i M_i^T M_i;
    `passes` counts the products of the whole stack with a thin matrix (0 for "exact").

    ``"exact"``: eigen-decompositions of the two Gram matrices (b x b, a x a) in float64. ``"fast"``: a block
    subspace iteration on each stacked matrix (`_block_svd`, products of M with thin matrices only). Where n
    exceeds a dimension, the missing directions are seeded random unit vectors.
    """
    L, b, a = M.shape
    nb, na = min(n, b), min(n, a)
    passes = 0
    if variant == "exact":
        left = _top_eigvecs(sum(m @ m.T for m in M.double()), nb)
        right = _top_eigvecs(sum(m.T @ m for m in M.double()), na)
    else:
        gen = _generator(M.device, seed)
        energy = energy_per_layer(M).sum()[None]
        width_b, width_a = min(nb + 8, b), min(na + 8, a)
        # [M_1 ... M_L]: apply x (1, L a, w) -> sum_i M_i x_i; its transpose y (1, b, w) -> stack_i M_i^T y
        side = (lambda X: (M @ X.reshape(L, a, -1)).sum(0, keepdim=True),
                lambda Y: (Y[0].mT @ M).mT.reshape(1, L * a, -1))
        start = side[0](_randn((1, L * a, width_b), M, gen))
        U, _, _, _, used = _block_svd(*side, start, M.new_zeros(1, b, 0), nb, energy, tol, rounds)
        left, passes = U[0], passes + 1 + used
        # [M_1; ...; M_L]: apply x (1, a, w) -> stack_i M_i x; its transpose y (1, L b, w) -> sum_i M_i^T y_i
        stack = (lambda X: (M @ X[0]).reshape(1, L * b, -1),
                 lambda Y: (Y.reshape(L, b, -1).mT @ M).mT.sum(0, keepdim=True))  # M's own layout: faster
        start = stack[0](_randn((1, a, width_a), M, gen))
        _, _, V, _, used = _block_svd(*stack, start, M.new_zeros(1, L * b, 0), na, energy, tol, rounds)
        right, passes = V[0], passes + 1 + used
    gen = _generator(torch.device("cpu"), seed)

    def pad(basis: Tensor, dim: int) -> Tensor:
        extra = torch.randn((dim, n - basis.shape[1]), generator=gen, dtype=torch.float64)
        return torch.cat([basis.to(M), (extra / extra.norm(dim=0).clamp_min(1e-300)).to(M)], 1)

    return pad(left, b), pad(right, a).T, passes


def stacked_factors(M: Tensor, r: int, k: int, variant: str = "exact", seed: int = 0) -> tuple[RasaFactors, int]:
    """The ``"stacked"`` start: the shared pool from the data (`stacked_pool`), d_i = diag(B_S^T M_i A_S^T)
    (eq. 26 with no private part: B_S, A_S have orthonormal columns / rows), private factors zero (the first
    iteration's eq. 18-19 computes them). Returns (factors, passes over M, `stacked_pool`'s and one for d_i)."""
    L, b, a = M.shape
    shared_B, shared_A, passes = stacked_pool(M, L * k, variant, seed)
    diag_rhs = ((shared_B.T @ M) * shared_A).sum(2)  # (L, Lk): diag(B_S^T M_i A_S^T)
    shared_D, _ = _shared_D_update(diag_rhs, shared_B, shared_A)
    zeros = M.new_zeros
    return RasaFactors(zeros(L, b, r - k), zeros(L, r - k, a), shared_B, shared_A, shared_D), passes + 1


def rasa_error(M: Tensor, factors: RasaFactors, chunk: int = 8) -> float:
    """Eq. 17 computed directly, `chunk` layers at a time (float64 accumulation)."""
    total = 0.0
    for start in range(0, M.shape[0], chunk):
        part = slice(start, start + chunk)
        piece = RasaFactors(factors.private_B[part], factors.private_A[part], factors.shared_B,
                            factors.shared_A, factors.shared_D[part])
        total += float((M[part] - piece.reconstruct()).double().square().sum())
    return total


# ---------------------------------------------------------------------------------- shared updates


def _shared_B_update(rhs_B: Tensor, shared_A: Tensor, shared_D: Tensor) -> tuple[Tensor, bool]:
    """Eq. 24: B_S = (sum_i N_i A_S^T D_i) (sum_i D_i A_S A_S^T D_i)^-1, with rhs_B = sum_i N_i A_S^T D_i (b, Lk)."""
    gram = (shared_A @ shared_A.T) * (shared_D.T @ shared_D)
    solution, fallback = solve_psd(gram, rhs_B.T)
    return solution.T, fallback


def _shared_A_update(rhs_A: Tensor, shared_B: Tensor, shared_D: Tensor) -> tuple[Tensor, bool]:
    """Eq. 25: A_S = (sum_i D_i B_S^T B_S D_i)^-1 (sum_i D_i B_S^T N_i), with rhs_A = sum_i D_i B_S^T N_i (Lk, a)."""
    gram = (shared_B.T @ shared_B) * (shared_D.T @ shared_D)
    return solve_psd(gram, rhs_A)


def _shared_D_update(diag_rhs: Tensor, shared_B: Tensor, shared_A: Tensor) -> tuple[Tensor, bool]:
    """Eq. 26: d_i = (B_S^T B_S o A_S A_S^T)^-1 diag(B_S^T N_i A_S^T), for all i at once; diag_rhs (L, Lk)."""
    gram = (shared_B.T @ shared_B) * (shared_A @ shared_A.T)
    solution, fallback = solve_psd(gram, diag_rhs.T)
    return solution.T, fallback


def _rebalance(factors: RasaFactors) -> Tensor:
    """Give each shared rank unit-norm B_S column and A_S row, moving the scale into D; returns A_S's row scale."""
    col = factors.shared_B.norm(dim=0)
    row = factors.shared_A.norm(dim=1)
    col = torch.where(col > 0, col, 1)
    row = torch.where(row > 0, row, 1)
    factors.shared_B = factors.shared_B / col
    factors.shared_A = factors.shared_A / row[:, None]
    factors.shared_D = factors.shared_D * (col * row)
    return row


# -------------------------------------------------------------------------------------- exact variant


def _exact_iteration(M: Tensor, f: RasaFactors, r_private: int) -> int:
    """One iteration of App. A with full SVDs, one layer at a time; updates `f` in place; returns fallbacks."""
    L = M.shape[0]
    if r_private > 0:
        for i in range(L):  # eq. 18-19
            residual = M[i] - f.shared_B @ (f.shared_D[i, :, None] * f.shared_A)
            U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
            root = S[:r_private].sqrt()
            f.private_B[i] = U[:, :r_private] * root
            f.private_A[i] = root[:, None] * Vh[:r_private]
    if f.shared_A.shape[0] == 0:
        return 0
    N = M - f.private_B @ f.private_A  # the targets of the shared part, [B^_i -B~_i][A^_i; A~_i] in eq. 24-26
    rhs_B = sum(N[i] @ f.shared_A.T * f.shared_D[i] for i in range(L))
    f.shared_B, fb_B = _shared_B_update(rhs_B, f.shared_A, f.shared_D)  # eq. 24
    rhs_A = sum(f.shared_D[i, :, None] * (f.shared_B.T @ N[i]) for i in range(L))
    f.shared_A, fb_A = _shared_A_update(rhs_A, f.shared_B, f.shared_D)  # eq. 25
    diag_rhs = torch.stack([((f.shared_B.T @ N[i]) * f.shared_A).sum(1) for i in range(L)])
    f.shared_D, fb_D = _shared_D_update(diag_rhs, f.shared_B, f.shared_A)  # eq. 26
    _rebalance(f)
    return int(fb_B) + int(fb_A) + int(fb_D)


# --------------------------------------------------------------------------------------- fast variant


class _FastDescent:
    """Batched coordinate descent state for the fast variant: private triplets (U, S, V) and shared factors.

    Keeps M @ A_S^T and M @ Omega (the next private step's start block) from one combined product, so an
    iteration reads M three times: M @ [A_S^T | Omega], M^T @ Q (private step), M^T @ B_S (eq. 25).
    """

    def __init__(self, M: Tensor, start: RasaFactors, warm: LoraSolution, theorem: bool, r_private: int,
                 oversample: int, power_iters: int, svd_tol: float, gen: torch.Generator) -> None:
        self.M, self.p, self.gen = M, r_private, gen
        self.oversample, self.power_iters, self.svd_tol = oversample, power_iters, svd_tol
        self.energy = energy_per_layer(M)
        self.B, self.A, self.D = start.shared_B.clone(), start.shared_A.clone(), start.shared_D.clone()
        # the private part as triplets; a zero private part (random start) keeps LoRA's vectors as warm start
        self.U, self.V = warm.U[..., :r_private].clone(), warm.V[..., :r_private].clone()
        self.S = warm.S[:, :r_private].clone() if theorem else M.new_zeros(M.shape[0], r_private)
        self.cross = self.energy.new_zeros(M.shape[0])  # <M_i, P_i>, set by every private step
        self.fallbacks, self.svd_estimate, self.passes = 0, 0.0, 0
        self._multiply_right()
        self.residual_energy = self._residual_energy()  # ||M_i - B_S D_i A_S||^2, valid until the shared step

    def _shared(self, X: Tensor) -> Tensor:  # (B_S D_i A_S) @ X_i, (L, b, w)
        return self.B @ (self.D[:, :, None] * (self.A @ X))

    def _shared_t(self, Y: Tensor) -> Tensor:  # (B_S D_i A_S)^T @ Y_i, (L, a, w)
        return self.A.T @ (self.D[:, :, None] * (self.B.T @ Y))

    def prepare_next_private(self) -> None:
        """Without shared ranks (k = 0) the pass that starts the next private step runs on its own."""
        self._multiply_right()

    def _multiply_right(self) -> None:
        """One pass: M @ [A_S^T | Omega] with Omega = [V, oversample random columns]."""
        L, _, a = self.M.shape
        width = min(self.p + self.oversample, a) - self.p if self.p else 0
        self.omega = torch.cat([self.V, _randn((L, a, width), self.M, self.gen)], -1)
        right = torch.cat([self.A.T.expand(L, -1, -1), self.omega], -1)
        product = self.M @ right
        self.passes += 1
        lk = self.A.shape[0]
        self.M_At, self.M_omega = product[..., :lk], product[..., lk:]

    def private_step(self) -> None:
        """Eq. 18-19 for all layers: top r-k triplets of R_i = M_i - B_S D_i A_S (`_block_svd`, `svd_tol`).

        The search space always holds the previous U, so the step never raises the error.
        """
        self.U, self.S, self.V, self.svd_estimate, passes = _block_svd(
            lambda X: self.M @ X - self._shared(X), lambda Y: (Y.mT @ self.M).mT - self._shared_t(Y),
            self.M_omega - self._shared(self.omega), self.U, self.p, self.residual_energy, self.svd_tol,
            self.power_iters + 1)
        self.passes += passes
        # <M_i, P_i> = sum_j s_j u_j^T M_i v_j = sum_j s_j (s_j + u_j^T B_S D_i A_S v_j)
        shared_uv = (((self.U.mT @ self.B) * self.D[:, None, :]) * (self.A @ self.V).mT).sum(2)
        self.cross = (self.S.double() * (self.S.double() + shared_uv.double())).sum(1)

    def shared_step(self) -> None:
        """Eq. 24, 25, 26 from thin products; then the rescaling of the shared ranks."""
        US, VS = self.U * self.S[:, None, :], self.V * self.S[:, None, :]
        N_At = self.M_At - US @ (self.V.mT @ self.A.T)  # N_i A_S^T, N_i = M_i - P_i
        self.B, fb_B = _shared_B_update((N_At * self.D[:, None, :]).sum(0), self.A, self.D)
        Nt_B = (self.B.T @ self.M).mT - VS @ (self.U.mT @ self.B)  # N_i^T B_S (B^T M keeps M's layout: faster)
        self.passes += 1
        self.A, fb_A = _shared_A_update((Nt_B * self.D[:, None, :]).sum(0).T, self.B, self.D)
        self._multiply_right()
        N_At = self.M_At - US @ (self.V.mT @ self.A.T)
        self.D, fb_D = _shared_D_update((self.B * N_At).sum(1), self.B, self.A)
        factors = RasaFactors(self.U, self.V.mT, self.B, self.A, self.D)
        row = _rebalance(factors)
        self.B, self.A, self.D, self.M_At = factors.shared_B, factors.shared_A, factors.shared_D, self.M_At / row
        self.fallbacks += int(fb_B) + int(fb_A) + int(fb_D)
        self.residual_energy = self._residual_energy()

    def _residual_energy(self) -> Tensor:
        """||M_i - B_S D_i A_S||^2 per layer, from M A_S^T (float64 sums)."""
        d = self.D.double()
        M_shared = (d * (self.M_At * self.B).sum(1).double()).sum(1)
        gram = ((self.B.T @ self.B) * (self.A @ self.A.T)).double()
        return self.energy - 2 * M_shared + ((d @ gram) * d).sum(1)

    def error(self) -> float:
        """Eq. 17 by expanding ||M_i - P_i - S_i||^2 = ||R_i||^2 - 2<M_i - S_i, P_i> + ||P_i||^2."""
        S = self.S.double()
        PS = (S * (((self.U.mT @ self.B) * self.D[:, None, :]) * (self.A @ self.V).mT).sum(2).double()).sum(1)
        per_layer = self.residual_energy - 2 * (self.cross - PS) + S.square().sum(1)
        return float(per_layer.sum())

    def factors(self) -> RasaFactors:
        root = self.S.sqrt()
        return RasaFactors(self.U * root[:, None, :], root[:, :, None] * self.V.mT, self.B, self.A, self.D)

# ---------------------------------------------------------------------------------------------- driver


def start_plan(init: str = DEFAULT_INIT, restarts: int = 1, seed: int = 0, k: int = 1) -> list[tuple[str, int]]:
    """The (start, seed) pairs `fit_rasa` runs: ``"auto"`` is ``"stacked"``, ``"theorem"`` and ``"random"`` (one
    start when k = 0, where all coincide with LoRA's optimum), any other init itself; ``restarts`` = N adds
    N - 1 ``"random"`` starts with seeds seed + 1 ... seed + N - 1."""
    if init not in INITS + ("auto",):
        raise ValueError(f"init={init!r} is unknown; choose one of {('auto',) + INITS}.")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts={restarts} is invalid; choose an integer >= 1 (1 = no restart).")
    plan = ([("stacked", seed), ("theorem", seed), ("random", seed)] if k > 0 else [("theorem", seed)]) \
        if init == "auto" else [(init, seed)]
    return plan + [("random", seed + j) for j in range(1, restarts)]


def fit_rasa(M: Tensor | Sequence[Tensor], r: int, k: int, iters: int = DEFAULT_MAX_ITERS, init: str = DEFAULT_INIT,
             variant: str = "fast", dtype: torch.dtype | None = None, seed: int = 0,
             lora: LoraSolution | None = None, oversample: int = 8, power_iters: int = 4, svd_tol: float = 3e-5,
             tol: float = DEFAULT_TOL, window: int = DEFAULT_WINDOW, restarts: int = 1,
             progress: Callable[[int, float], None] | None = None) -> FitResult:
    """Fit RaSA (rank r, k shared ranks per layer) to a group M (L, b, a) by coordinate descent (App. A).

    Args:
        M: the group's matrices, (L, b, a) or a list of L (b, a) tensors; the work runs on M's device.
        iters: the most coordinate-descent iterations per start; `error_curve` gets one value after each.
        init: ``"auto"`` (default: ``"stacked"``, ``"theorem"`` and ``"random"``, the best kept),
            ``"stacked"``, ``"theorem"`` or ``"random"`` (see the module docstring).
        tol, window: stop a start once the error fell by less than window * tol (relative) over the last
            `window` iterations, i.e. by less than `tol` per iteration on average; 0 runs all `iters`.
            `FitResult.converged` says whether it stopped so (False: the limit `iters` stopped it).
        restarts: N >= 1; N - 1 ``"random"`` starts (seeds seed + 1, ...) are added; the best is kept and
            `FitResult.starts` lists every start's outcome.
        variant: ``"fast"`` (batched, truncated SVD) or ``"exact"`` (full SVD per layer, the reference).
        dtype: computation dtype; default float64 for "exact", float32 (or M's float64) for "fast".
        lora: a precomputed `lora_solution(M, r)`, reused across a k sweep.
        progress: called as progress(iteration, error) after every iteration of every start.
    """
    _check_variant(variant)
    plan = start_plan(init, restarts, seed, k)
    if iters < 0:
        raise ValueError(f"iters={iters} is negative; choose iters >= 0.")
    if not tol >= 0:
        raise ValueError(f"tol={tol} is invalid; choose tol >= 0 (0 runs every iteration).")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window} is invalid; choose an integer >= 1.")
    M = check_group(M, r, k)
    dtype = dtype or (torch.float64 if variant == "exact" or M.dtype == torch.float64 else torch.float32)
    M = M.to(dtype)
    started = time.perf_counter()
    if lora is None:
        lora = lora_solution(M, r, variant, seed=seed)
    lora = LoraSolution(lora.U.to(dtype), lora.S.to(dtype), lora.V.to(dtype), lora.energy, lora.tol_reached)
    best: FitResult | None = None
    outcomes = []
    for start_init, start_seed in plan:
        result = _fit_one(M, r, k, iters, start_init, variant, start_seed, lora, oversample, power_iters, svd_tol,
                          tol, window, progress)
        outcomes.append({"init": start_init, "seed": start_seed, "final_error": result.final_error,
                         "iterations": result.iterations, "converged": result.converged,
                         "initial_error": result.initial_error, "error_curve": result.error_curve})
        if best is None or result.final_error < best.final_error:
            best = result
    best.starts, best.tol = outcomes, tol
    best.wall_time_s = time.perf_counter() - started
    return best


def _fit_one(M: Tensor, r: int, k: int, iters: int, init: str, variant: str, seed: int, lora: LoraSolution,
             oversample: int, power_iters: int, svd_tol: float, tol: float, window: int,
             progress: Callable[[int, float], None] | None) -> FitResult:
    """Coordinate descent from one start, until the criterion (`tol`, `window`) is met or `iters` ran."""
    start_passes = 0
    if init == "theorem":
        start = theorem_factors(lora, k)
    elif init == "stacked":
        start, start_passes = stacked_factors(M, r, k, variant, seed)
    else:
        start = random_factors(M, r, k, seed)
    # the start's error: all of ||M||^2 for "random"; e_lora for "theorem" (eq. 16; exact for Ritz triplets too)
    initial = {"theorem": lora.error, "random": float(lora.energy.sum())}.get(init)
    if initial is None:
        initial = rasa_error(M, start)
    result = FitResult(start, lora.error, float(lora.energy.sum()), initial, init=init, seed=seed)

    def record(t: int, error: float) -> bool:
        """Append the error; True when the criterion is met: over the last `window` iterations the error fell by
        less than window * tol of its value before them (a mean relative decrease below `tol`)."""
        result.error_curve.append(error)
        result.iterations = t + 1
        if progress:
            progress(t, error)
        if tol > 0 and t + 1 >= window:
            before = result.error_curve[t - window] if t >= window else result.initial_error
            result.converged = before - error < window * tol * before
        return result.converged

    if variant == "exact":
        result.factors = start.to(M.dtype)
        for t in range(iters):
            result.gram_fallbacks += _exact_iteration(M, result.factors, r - k)
            if record(t, rasa_error(M, result.factors)):
                break
    else:
        descent = _FastDescent(M, start, lora, init == "theorem", r - k, oversample, power_iters, svd_tol,
                               _generator(M.device, seed + 1))
        for t in range(iters):
            if r > k:
                descent.private_step()
            if k > 0:
                descent.shared_step()
            else:
                descent.prepare_next_private()
            if record(t, descent.error()):
                break
        result.factors, result.gram_fallbacks = descent.factors(), descent.fallbacks
        result.svd_estimate, result.passes = descent.svd_estimate, descent.passes + start_passes
    result.final_error = rasa_error(M, result.factors) if result.iterations else result.initial_error
    return result


def k_sweep(M: Tensor | Sequence[Tensor], r: int, ks: Sequence[int] | None = None, iters: int = DEFAULT_MAX_ITERS,
            lora: LoraSolution | None = None, **fit_kwargs) -> dict[int, float]:
    """Final RaSA error for each k in `ks` (default 0..r), as in the paper's Figure 3; k = 0 is e_lora."""
    ks = list(range(r + 1)) if ks is None else list(ks)
    M = check_group(M, r, 0)
    variant = fit_kwargs.get("variant", "fast")
    lora = lora or lora_solution(M, r, variant, seed=fit_kwargs.get("seed", 0))
    return {k: fit_rasa(M, r, k, iters, lora=lora, **fit_kwargs).final_error for k in ks}
