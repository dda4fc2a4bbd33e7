"""Issue 29: the data start, the convergence criterion and restarts (the analysis gives one answer from any seed)."""

from __future__ import annotations

import pytest
import torch

from rasa_lora.analysis.reconstruction import (
    fit_rasa,
    lora_solution,
    rasa_error,
    stacked_factors,
    stacked_pool,
    start_plan,
)
from rasa_lora.analysis.sources import checkpoint_groups

R, K = 8, 1


def _projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


def test_stacked_pool_spans_the_leading_singular_vectors_of_the_stacked_deltas(group64):
    L = group64.shape[0]
    B_S, A_S, _ = stacked_pool(group64, L * K, "exact")
    side_by_side = torch.cat(list(group64), dim=1)  # [M_1 ... M_L], (b, L a)
    on_top = torch.cat(list(group64), dim=0)  # [M_1; ...; M_L], (L b, a)
    U = torch.linalg.svd(side_by_side, full_matrices=False)[0][:, : L * K]
    V = torch.linalg.svd(on_top, full_matrices=False)[2][: L * K].T
    assert torch.allclose(_projector(B_S), _projector(U), atol=1e-8)
    assert torch.allclose(_projector(A_S.T), _projector(V), atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_stacked_pool_captures_the_energy_of_the_exact_one(group64, seed):
    """A subspace iteration is judged by the energy it captures (near-equal singular values at the cut make the
    subspace itself ill-defined); measured shortfall 2e-6 to 6e-6."""
    L = group64.shape[0]
    side_by_side, on_top = torch.cat(list(group64), dim=1), torch.cat(list(group64), dim=0)
    exact = stacked_pool(group64, L * K, "exact")[:2]
    fast, passes = stacked_pool(group64, L * K, "fast", seed=seed)[:2], stacked_pool(group64, L * K, "fast")[2]
    assert 4 <= passes <= 82  # two subspace iterations: a start product and at least one round each
    for B_S, A_S in (exact, fast):
        assert torch.allclose(B_S.T @ B_S, torch.eye(L * K, dtype=B_S.dtype), atol=1e-8)
        assert torch.allclose(A_S @ A_S.T, torch.eye(L * K, dtype=A_S.dtype), atol=1e-8)
    left = [float((B_S.T @ side_by_side).square().sum()) for B_S, _ in (exact, fast)]
    right = [float((on_top @ A_S.T).square().sum()) for _, A_S in (exact, fast)]
    assert left[1] == pytest.approx(left[0], rel=1e-5) and left[1] <= left[0] * (1 + 1e-12)
    assert right[1] == pytest.approx(right[0], rel=1e-5) and right[1] <= right[0] * (1 + 1e-12)


def test_stacked_pool_pads_with_unit_vectors_when_the_pool_is_wider_than_the_matrix():
    M = torch.randn(8, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    B_S, A_S, _ = stacked_pool(M, 8)  # 8 > b = 6
    assert B_S.shape == (6, 8) and A_S.shape == (8, 10)
    assert torch.allclose(B_S.norm(dim=0), torch.ones(8, dtype=torch.float64))


def test_stacked_start_d_is_the_least_squares_fit_and_its_error_is_reported(group64):
    start = stacked_factors(group64, R, K)[0]
    expected = torch.einsum("bj,lba,ja->lj", start.shared_B, group64, start.shared_A)  # diag(B_S^T M_i A_S^T)
    assert torch.allclose(start.shared_D, expected, atol=1e-10)
    assert float(start.private_B.abs().max()) == 0 and float(start.private_A.abs().max()) == 0
    result = fit_rasa(group64, R, K, 0, init="stacked", variant="exact")
    assert result.initial_error == pytest.approx(rasa_error(group64, start), rel=1e-12)
    assert result.initial_error < result.total_energy


def test_auto_keeps_the_best_of_the_stacked_theorem_and_random_starts(group64):
    result = fit_rasa(group64, R, K, 30, variant="exact", seed=3)
    assert [(s["init"], s["seed"]) for s in result.starts] == [("stacked", 3), ("theorem", 3), ("random", 3)]
    alone = {init: fit_rasa(group64, R, K, 30, init=init, variant="exact", seed=3).final_error
             for init in ("stacked", "theorem", "random")}
    assert result.final_error == pytest.approx(min(alone.values()), rel=1e-12)
    assert result.init == min(alone, key=alone.get)
    assert result.final_error <= alone["theorem"]


@pytest.mark.parametrize("window", [1, 5])
def test_criterion_stops_at_the_first_small_mean_decrease_and_says_so(group64, window):
    tol = 1e-3
    result = fit_rasa(group64, R, K, 200, init="stacked", variant="exact", tol=tol, window=window)
    curve = [result.initial_error] + result.error_curve
    met = [t for t in range(window, len(curve)) if curve[t - window] - curve[t] < window * tol * curve[t - window]]
    assert result.converged and result.iterations == len(result.error_curve) < 200
    assert met == [len(curve) - 1]  # met at the last iteration, and not before
    assert result.iterations >= window


def test_zero_tolerance_runs_every_iteration(group64):
    result = fit_rasa(group64, R, K, 7, init="stacked", variant="exact", tol=0)
    assert result.iterations == len(result.error_curve) == 7 and not result.converged


def test_iteration_limit_reached_is_not_converged(group64):
    result = fit_rasa(group64, R, K, 3, init="random", variant="exact", tol=1e-12)
    assert result.iterations == 3 and not result.converged


def test_restarts_add_seeded_random_starts_and_keep_the_best(group64):
    result = fit_rasa(group64, R, K, 10, init="theorem", variant="exact", seed=5, restarts=3, tol=0)
    assert [(s["init"], s["seed"]) for s in result.starts] == [("theorem", 5), ("random", 6), ("random", 7)]
    errors = [s["final_error"] for s in result.starts]
    assert result.final_error == min(errors)
    assert result.start_spread == pytest.approx((max(errors) - min(errors)) / min(errors))
    assert result.start_spread > 0
    again = fit_rasa(group64, R, K, 10, init="random", variant="exact", seed=7, tol=0)
    assert again.final_error == pytest.approx(errors[2], rel=1e-12)  # each restart is reproducible alone


def test_start_plan_and_its_refusals():
    assert start_plan("auto", 1, 0, k=0) == [("theorem", 0)]  # without shared ranks both starts coincide
    assert start_plan("random", 3, 4) == [("random", 4), ("random", 5), ("random", 6)]
    with pytest.raises(ValueError, match="init='zeros'"):
        start_plan("zeros")
    with pytest.raises(ValueError, match="restarts=0"):
        start_plan("auto", 0)


def test_negative_tolerance_and_empty_window_are_refused(group64):
    with pytest.raises(ValueError, match="tol=-1"):
        fit_rasa(group64, R, K, 3, tol=-1)
    with pytest.raises(ValueError, match="window=0"):
        fit_rasa(group64, R, K, 3, window=0)


# -------------------------------------------------------------------- acceptance on the seeded correlated pair


@pytest.mark.slow
def test_default_fit_is_seed_independent_and_never_worse_than_theorem_on_the_correlated_pair(pair):
    """Issue 29's acceptance: default settings, seeds 0/1/2, every group of the pair: spread <= 2%, never above
    the theorem start's result (same criterion), a curve that never rises. The random start alone, with the
    same criterion, spreads by more than 2% on this pair (measured 3.8% on k_proj), so the check can fail."""
    random_spread = 0.0
    for group in checkpoint_groups(*pair):
        M = group.deltas
        finals = []
        for seed in (0, 1, 2):
            lora = lora_solution(M, R, "fast", seed=seed)
            result = fit_rasa(M, R, K, lora=lora, seed=seed)
            theorem = next(s for s in result.starts if s["init"] == "theorem")
            assert result.final_error <= theorem["final_error"]
            for start in result.starts:
                curve = torch.tensor([start["initial_error"]] + start["error_curve"], dtype=torch.float64)
                assert float(curve.diff().max()) <= 1e-6 * result.total_energy  # float32 rounding of the curve
            finals.append(result.final_error)
        assert max(finals) <= 1.02 * min(finals), group.name
        if group.name.endswith("k_proj"):
            randoms = [fit_rasa(M, R, K, init="random", seed=seed).final_error for seed in (0, 1, 2)]
            random_spread = max(randoms) / min(randoms) - 1
    assert random_spread > 0.02
