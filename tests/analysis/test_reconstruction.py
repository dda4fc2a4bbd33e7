"""The mathematics of paper Sec. 3 / App. A: LoRA's optimum, Theorem 3.1, coordinate descent, fast vs exact."""

from __future__ import annotations

import pytest
import torch

from rasa_lora.analysis.reconstruction import (
    fit_rasa,
    k_sweep,
    lora_solution,
    rasa_error,
    solve_psd,
    theorem_factors,
)
from tests.analysis.conftest import correlated_group

R, K = 8, 1


def test_lora_error_is_the_sum_of_discarded_squared_singular_values(group64):
    expected = float(torch.linalg.svdvals(group64)[:, R:].square().sum())
    assert lora_solution(group64, R).error == pytest.approx(expected, rel=1e-12)


def test_lora_factors_reach_lora_error(group64):
    lora = lora_solution(group64, R)
    approx = (lora.U * lora.S[:, None, :]) @ lora.V.mT
    assert float((group64 - approx).square().sum()) == pytest.approx(lora.error, rel=1e-10)


def test_fast_lora_error_matches_exact_svd(group64):
    exact, fast = lora_solution(group64, R, "exact"), lora_solution(group64, R, "fast")
    assert fast.error == pytest.approx(exact.error, rel=1e-4)
    assert fast.error >= exact.error * (1 - 1e-12)  # a subspace method can only capture less energy


@pytest.mark.parametrize("k", [1, 2, 8])
def test_theorem_construction_reaches_lora_error(group64, k):
    lora = lora_solution(group64, R)
    error = rasa_error(group64, theorem_factors(lora, k))
    assert abs(error - lora.error) <= 1e-8 * lora.error


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_descent_from_theorem_never_ends_above_lora(group64, variant):
    result = fit_rasa(group64, R, K, 10, init="theorem", variant=variant, dtype=torch.float64)
    assert result.initial_error == pytest.approx(result.lora_error, rel=1e-8)
    assert max(result.error_curve) <= result.lora_error * (1 + 1e-10)


@pytest.mark.parametrize("variant", ["exact", "fast"])
@pytest.mark.parametrize("init", ["random", "theorem", "stacked"])
def test_descent_never_increases_the_error(group64, variant, init):
    result = fit_rasa(group64, R, K, 15, init=init, variant=variant, dtype=torch.float64, tol=0)
    curve = torch.tensor([result.initial_error] + result.error_curve, dtype=torch.float64)
    assert float(curve.diff().max()) <= 1e-9 * result.total_energy


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_k_zero_reproduces_lora(group64, variant):
    result = fit_rasa(group64, R, 0, 3, variant=variant, dtype=torch.float64)
    tolerance = 1e-10 if variant == "exact" else 1e-5
    assert result.final_error == pytest.approx(result.lora_error, rel=tolerance)
    assert result.factors.shared_A.shape == (0, group64.shape[2])


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_rasa_ends_below_lora_on_layer_correlated_matrices(variant):
    M = correlated_group(num_layers=16)
    result = fit_rasa(M, 8, 1, 20, init="random", variant=variant)
    assert result.final_error < result.lora_error


@pytest.mark.parametrize("init", ["random", "theorem", "stacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_final_error_matches_exact(group64, init, dtype):
    exact = fit_rasa(group64, R, K, 20, init=init, variant="exact", tol=0)
    fast = fit_rasa(group64, R, K, 20, init=init, variant="fast", dtype=dtype, tol=0)
    assert fast.final_error == pytest.approx(exact.final_error, rel=1e-3)


def test_fast_curve_agrees_with_the_direct_error(group64):
    result = fit_rasa(group64, R, K, 5, variant="fast", dtype=torch.float64)
    assert result.error_curve[-1] == pytest.approx(result.final_error, rel=1e-9)


def test_factors_reconstruct_to_the_reported_error(group64):
    result = fit_rasa(group64, R, K, 5, variant="exact")
    direct = float((group64 - result.factors.reconstruct()).square().sum())
    assert direct == pytest.approx(result.final_error, rel=1e-12)


def test_adapter_D_puts_ones_on_private_ranks(group64):
    factors = fit_rasa(group64, R, K, 2, variant="exact").factors
    D = factors.adapter_D()
    L = group64.shape[0]
    assert D.shape == (L, R - K + L * K)
    assert torch.equal(D[:, : R - K], torch.ones(L, R - K, dtype=D.dtype))
    assert torch.equal(D[:, R - K:], factors.shared_D)


def test_eq5_form_with_adapter_D_equals_eq11_form(group64):
    f = fit_rasa(group64, R, K, 2, variant="exact").factors
    i = 3
    B = torch.cat([f.private_B[i], f.shared_B], 1)
    A = torch.cat([f.private_A[i], f.shared_A], 0)
    eq5 = B @ torch.diag(f.adapter_D()[i]) @ A
    assert torch.allclose(eq5, f.reconstruct()[i], atol=1e-12)


def test_all_ranks_shared_runs_and_guards_singular_grams():
    M = correlated_group(num_layers=8, b=12, a=40)  # L*k = 64 > b = 12: B_S^T B_S is singular
    result = fit_rasa(M, 8, 8, 5, init="random", variant="exact")  # the data start's pool avoids the singularity
    assert result.gram_fallbacks > 0
    assert torch.isfinite(result.factors.reconstruct()).all()
    curve = torch.tensor([result.initial_error] + result.error_curve)
    assert float(curve.diff().max()) <= 1e-9 * result.total_energy


def test_solve_psd_falls_back_to_the_minimum_norm_solution():
    gram = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    solution, fallback = solve_psd(gram, torch.tensor([[4.0], [0.0]], dtype=torch.float64))
    assert fallback
    assert torch.allclose(solution, torch.tensor([[2.0], [0.0]], dtype=torch.float64))


def test_solve_psd_uses_cholesky_when_well_conditioned():
    gram = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    rhs = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    solution, fallback = solve_psd(gram, rhs)
    assert not fallback
    assert torch.allclose(gram @ solution, rhs)


def test_k_sweep_starts_at_lora_and_covers_every_k(group64):
    sweep = k_sweep(group64, 4, iters=3, variant="exact")
    assert list(sweep) == [0, 1, 2, 3, 4]
    assert sweep[0] == pytest.approx(lora_solution(group64, 4).error, rel=1e-12)


def test_random_start_is_the_same_in_every_dtype(group64):
    a = fit_rasa(group64, R, K, 1, variant="exact", dtype=torch.float64)
    b = fit_rasa(group64.float(), R, K, 1, variant="exact", dtype=torch.float32)
    assert b.final_error == pytest.approx(a.final_error, rel=1e-4)


# --------------------------------------------------------------------------------------------- bad input


def test_k_larger_than_r_is_refused(group64):
    with pytest.raises(ValueError, match="k=9"):
        fit_rasa(group64, 8, 9)


def test_empty_group_is_refused():
    with pytest.raises(ValueError, match="empty"):
        fit_rasa([], 8, 1)


def test_nan_is_refused_naming_the_layer(group64):
    bad = group64.clone()
    bad[5, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        fit_rasa(bad, 8, 1)


def test_mixed_shapes_are_refused():
    with pytest.raises(ValueError, match="share one shape"):
        fit_rasa([torch.zeros(4, 5), torch.zeros(5, 4)], 2, 1)


def test_rank_above_matrix_size_is_refused():
    with pytest.raises(ValueError, match="r=8 is larger"):
        lora_solution(torch.randn(2, 6, 5), 8)


def test_unknown_variant_and_init_are_refused(group64):
    with pytest.raises(ValueError, match="variant"):
        fit_rasa(group64, 8, 1, variant="slow")
    with pytest.raises(ValueError, match="init"):
        fit_rasa(group64, 8, 1, init="zeros")
