"""The hash dropout mask: what dropout needs from it, and the Triton kernels drawing the same bits."""

import os

import pytest
import torch

from rasa_lora.ops import dropout as hashmask
from tests.benchmark_scripts import load_benchmark


def test_reproducible_seed_dependent_and_row_offset_consistent():
    first = hashmask.keep_mask(300, 200, 7, 0.25)
    assert torch.equal(first, hashmask.keep_mask(300, 200, 7, 0.25))
    assert (first != hashmask.keep_mask(300, 200, 8, 0.25)).float().mean() > 0.3
    assert torch.equal(first[100:], hashmask.keep_mask(200, 200, 7, 0.25, row_offset=100))
    # a mask over more columns extends, it does not reshuffle, the first columns of each row
    assert torch.equal(first, hashmask.keep_mask(300, 260, 7, 0.25)[:, :200])


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    mask = hashmask.keep_mask(1024, 1024, 123, p).double()
    n = mask.numel()
    std = ((1 - p) * p / n) ** 0.5
    assert abs(mask.mean().item() - (1 - p)) < 5 * std
    # every row and every column keeps about 1-p as well (no striped structure)
    for rate in (mask.mean(0), mask.mean(1)):
        assert (rate - (1 - p)).abs().max().item() < 6 * ((1 - p) * p / 1024) ** 0.5


def test_neighbours_and_seeds_are_uncorrelated():
    p = 0.3
    mask = hashmask.keep_mask(1024, 1024, 99, p).double()
    centred = mask - mask.mean()
    var = centred.pow(2).mean()
    bound = 5 / 1024  # ~5 standard errors of a correlation estimated from 1M pairs
    for shifted, original in ((centred[1:], centred[:-1]), (centred[:, 1:], centred[:, :-1]),
                              (centred[1:, 1:], centred[:-1, :-1]), (centred[:, 8:], centred[:, :-8])):
        assert abs((shifted * original).mean() / var) < bound
    # the two columns drawn from one hash word (2q, 2q+1), and neighbouring words (2q+1, 2q+2)
    assert abs((centred[:, 0::2] * centred[:, 1::2]).mean() / var) < 2 * bound
    assert abs((centred[:, 1:-1:2] * centred[:, 2::2]).mean() / var) < 2 * bound
    other = hashmask.keep_mask(1024, 1024, 100, p).double()
    other = other - other.mean()
    assert abs((other * centred).mean() / var) < bound
    # consecutive seeds, as successive layers would draw them, do not give shifted copies of each other
    assert abs((other[1:] * centred[:-1]).mean() / var) < bound


def _block_chi2(mask: torch.Tensor, p: float, shift: int) -> float:
    """`benchmarks/experiments/mask_quality.py`'s 2 x 2 block chi-square (one definition for test and benchmark)."""
    return load_benchmark("experiments/mask_quality").block_chi2(mask, p, shift)


@pytest.mark.parametrize("seed", [5, 6])
def test_two_by_two_blocks_are_independent_draws(seed):
    # blocks aligned with one hash word's two columns (rows i, i+1: two words of the same column pair) and shifted
    # by one column (two neighbouring words); 15 degrees of freedom, 99.9% quantile 37.7. Combining the row and
    # column hashes by addition before one multiply gives 148-891 here (`benchmarks/experiments/mask_quality.py`)
    mask = hashmask.keep_mask(1024, 1026, seed, 0.5)
    assert _block_chi2(mask[:, :1024], 0.5, 0) < 37.7
    assert _block_chi2(mask, 0.5, 1) < 37.7  # columns 1-1024


def test_the_mask_is_the_documented_hash():
    # the definition in dropout.py, pinned: a change of hash changes every training run's masks (say so if intended)
    seed, rows, cols = 3, 4, 16
    mask = hashmask.keep_mask(rows, cols, seed, 0.5)
    assert ["".join("1" if kept else "0" for kept in row) for row in mask.tolist()] == [
        "0100101010001110", "1011100011111111", "1001010100000011", "0011100111110001"]
    # the same from the formula written out on Python ints
    def word(i, q):
        s = hashmask.mix32(seed)
        v = ((hashmask.mix32(i + s) | 1) * (hashmask.mix32(((q * hashmask.COLUMN) & 0xFFFFFFFF) ^ s) | 1)) & 0xFFFFFFFF
        return v ^ (v >> 16)

    t = hashmask.threshold(0.5)
    for i in range(rows):
        for c in range(cols):
            half = word(i, c // 2) >> 16 if c % 2 else word(i, c // 2) & 0xFFFF
            assert bool(mask[i, c]) == (half >= t)


@pytest.mark.parametrize(("rows", "cols", "row_offset", "p"),
                         [(5, 7, 0, 0.3), (3, 1, 11, 0.5), (6, 9, 2**31 - 3, 0.05)])
def test_odd_widths_and_row_offsets_follow_the_formula(rows, cols, row_offset, p):
    """The pairwise computation (one word per column pair) on odd widths, a lone column and large row indices."""
    seed = 2**31 - 2
    s = hashmask.mix32(seed)
    mask = hashmask.keep_mask(rows, cols, seed, p, row_offset=row_offset)
    assert mask.shape == (rows, cols)
    t = hashmask.threshold(p)
    for i in range(rows):
        hr = hashmask.mix32(i + row_offset + s) | 1
        for c in range(cols):
            v = (hr * (hashmask.mix32(((c // 2 * hashmask.COLUMN) & 0xFFFFFFFF) ^ s) | 1)) & 0xFFFFFFFF
            h = v ^ (v >> 16)
            assert bool(mask[i, c]) == (((h >> 16) if c % 2 else (h & 0xFFFF)) >= t), (i, c)


def test_threshold_and_edge_probabilities():
    assert hashmask.threshold(0.0) == 0
    assert hashmask.threshold(0.5) == 2**15
    assert hashmask.effective_p(0.05) == 3277 / 2**16
    assert hashmask.keep_mask(64, 64, 1, 0.0).all()
    assert not hashmask.keep_mask(64, 64, 1, 0.999999999).any()


def test_dropout_mask_has_the_shape_of_its_input():
    x = torch.empty(3, 5, 7)
    mask = hashmask.dropout_mask(x, 0.2, 11)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    assert torch.equal(mask.reshape(15, 7), hashmask.keep_mask(15, 7, 11, 0.2))


def _triton_devices():
    from rasa_lora.ops import kernels

    if not kernels.available():
        return [pytest.param("none", marks=pytest.mark.skip(reason="triton is not installed"))]
    devices = [pytest.param("cuda", marks=pytest.mark.gpu)]
    if os.environ.get("TRITON_INTERPRET") == "1":
        devices.append("cpu")
    return devices


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize(("seed", "p"), [(0, 0.05), (2**31 - 2, 0.3), (12345, 0.75)])
def test_triton_kernels_draw_the_same_bits(device, seed, p):
    from rasa_lora.ops import triton_backend
    from rasa_lora.ops.cublas_backend import CublasBackend

    expected = hashmask.keep_mask(100, 150, seed, p, device)
    got = triton_backend.keep_mask(100, 150, hashmask.seed_hash(seed), hashmask.threshold(p), device)
    assert torch.equal(got, expected)
    # the cuBLAS backend's mask: drawn by that kernel on CUDA, by the twin elsewhere; the same bits either way
    assert torch.equal(CublasBackend().keep(torch.empty(100, 150, device=device), p, seed), expected)
