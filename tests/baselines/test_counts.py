"""`rasa-lora params` for MoRA and PriLoRA against the paper's Tables 1-2 (Llama-3.1-8B and Mistral-7B-v0.3 share
the projection shapes, so the counts are the same)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rasa_lora.params import ALL_PROJ, count_trainable, human, load_config, main

PAPER = Path(__file__).resolve().parents[2].parent / "shared" / "paper" / "000_5ed23578a0b2cea5.txt"
MORA_SHARING = {8: 20_961_536, 16: 41_927_264, 32: 83_897_920}   # r^ = int(sqrt((in + out) r) + 0.5)
MORA_ROTATION = {8: 20_961_536, 16: 41_823_104, 32: 83_846_144}  # r^ rounded down to even (type 6)
PRILORA = {8: 21_299_200, 16: 42_598_400, 32: 85_196_800}        # ranks sum to L r + r/2
PRILORA_EXTRA = {8: 10_117_120, 16: 20_234_240, 32: 40_468_480}  # an importance value per entry of A


def _paper_rows() -> dict[tuple[str, int], tuple[str, str | None]]:
    """(method, r) -> (# Trainable Param., # Extra Param.) of MoRA and PriLoRA, from the paper's Table 2."""
    lines = PAPER.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 2:"))
    rows, r = {}, None
    for line in lines[start:start + 40]:
        cells = [cell.strip() for cell in line.split("\t")]
        if len(cells) > 3 and cells[1] in ("MoRA", "PriLoRA"):
            r = int(cells[0]) if cells[0].isdigit() else r  # the r label sits on each group's MoRA row
            extra = cells[3] if re.fullmatch(r"[\d.]+M", cells[3]) else None
            rows[(cells[1].lower(), r)] = (cells[2], extra)
    return rows


@pytest.mark.skipif(not PAPER.is_file(), reason="needs the paper's text in ../shared/paper")
@pytest.mark.parametrize("architecture", ["llama-3.1-8b", "mistral-7b-v0.3"])
def test_counts_against_the_papers_column(architecture):
    config, paper = load_config(architecture), _paper_rows()
    for r in (8, 16, 32):
        sharing = count_trainable(config, "mora", r, None, ALL_PROJ, mora_type=1)
        assert sharing.trainable == MORA_SHARING[r] and human(sharing.trainable) == paper[("mora", r)][0]
        rotation = count_trainable(config, "mora", r, None, ALL_PROJ)
        assert rotation.trainable == MORA_ROTATION[r]  # 41.8M / 83.8M at r = 16 / 32: see docs/baselines.md
        prilora = count_trainable(config, "prilora", r, None, ALL_PROJ)
        assert prilora.trainable == PRILORA[r] and human(prilora.trainable) == paper[("prilora", r)][0]
        assert prilora.extra == PRILORA_EXTRA[r]
        # the paper's extra column is half its (rounded) trainable one, A's share where every in = out; on Llama A
        # holds 47.5% of the parameters (in 38912 vs out 43008 a layer), hence 10.1M here against its 10.7M
        trainable_m, extra_m = (float(text[:-1]) for text in paper[("prilora", r)])
        assert abs(2 * extra_m - trainable_m) < 0.15 and human(prilora.extra) != paper[("prilora", r)][1]


def test_table_lists_the_baselines(capsys):
    assert main(["llama-3.1-8b", "--ranks", "8", "--methods", "mora", "prilora"]) == 0
    out = capsys.readouterr().out
    assert "20,961,536" in out and "r^ = 202, 256, 384" in out
    assert "21,299,200" in out and "10.1M" in out and "r_i = 4 .. 12" in out
