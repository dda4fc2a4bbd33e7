"""`benchmarks/experiments/floor.py`: the bytes the adapter's token-sized passes move in a decoder layer's step."""

from tests.benchmark_scripts import load_benchmark


def _floor_module():
    return load_benchmark("experiments/floor")


def test_layer_bytes_count_each_pass_once_per_token():
    floor = _floor_module()
    read, written = floor.layer_bytes(1)
    # inputs: q, k, v, gate, up and o read 4096 columns, down_proj 14336; outputs 4096 + 2 * 1024 + 4096 + 2 * 14336
    # + 4096; down_proj's output term is not recomputed
    inputs, outputs = 6 * 4096 + 14336, 3 * 4096 + 2 * 1024 + 2 * 14336
    assert read == 2 * (2 * inputs + outputs)
    assert written == 2 * (inputs + outputs + outputs - 4096)
    assert floor.layer_bytes(16384) == (16384 * read, 16384 * written)


def test_grouping_shares_the_input_passes_of_q_k_v_and_gate_up():
    floor = _floor_module()
    read, written = floor.layer_bytes(1)
    g_read, g_written = floor.layer_bytes(1, grouped=True)
    saved_inputs = 3 * 4096  # k and v share q's input, up shares gate's
    assert read - g_read == 2 * 2 * saved_inputs  # down and ga
    assert written - g_written == 2 * saved_inputs  # one dL/dx write a group
