"""`benchmarks/grouped.py`: the experimental group kernels (projections sharing an input) give what the library's
kernels give one member at a time: the same u, dL/dx and dA, with each member's own dropout mask."""

import os

import pytest
import torch

from tests.benchmark_scripts import load_benchmark


def _grouped(monkeypatch, dry: bool):
    from rasa_lora.ops import kernels

    if not kernels.available():
        pytest.skip("needs triton")
    monkeypatch.setenv("GROUPED_DRY_RUN", "1" if dry else "0")
    return load_benchmark("grouped")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU runs Triton kernels only under "
                    "TRITON_INTERPRET=1")
@pytest.mark.parametrize("members", [(64, 16, 16), (80, 80)])
def test_group_kernels_match_one_member_at_a_time_on_the_interpreter(monkeypatch, members):
    grouped = _grouped(monkeypatch, dry=True)
    errors = grouped.check(96, 64, members)  # float32; 96 rows, 64 columns: several row and column blocks
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
@pytest.mark.parametrize("members", [(512, 128, 128), (1024, 1024)])
def test_group_kernels_match_one_member_at_a_time_on_the_gpu(monkeypatch, members):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    grouped = _grouped(monkeypatch, dry=False)
    errors = grouped.check(1000, 512, members)  # bf16; odd row count
    assert max(errors.values()) < 2e-2, errors
