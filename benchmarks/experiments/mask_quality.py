"""Statistics of the dropout mask's hash: the committed one (`rasa_lora.ops.dropout`) against the one it replaced.

    PYTHONPATH=src python benchmarks/experiments/mask_quality.py [--size 2048] [--seeds 10] [--first-seed 100]
                                                      [--ps 0.05,0.1,0.5] [--out FILE.json]

Session 7 replaced the per-word hash h(i, q) = mix(hr_i ^ q * 0x61C88647) (two multiplies, three xorshifts a word)
by the product of an odd row hash and an odd column-pair hash, xorshifted once (`dropout.py`): about half the
integer work in every mask-carrying kernel. A first candidate, (hr_i ^ hc_q) * 0x21F0AAAD xorshifted once, was
as fast on the GPU but failed the 2 x 2 block test below on average over seeds; it is measured here as well
("xor-multiply", rejected). This measures, on the CPU, what dropout needs from a mask for each definition, on
masks of size x size at several p, summarised over seeds:

- keep rate: z-score of the mean against 1 - p; the largest z-score of any row's or column's rate;
- correlations (in units of their standard error, ~N(0, 1) for an independent mask) between an element and its
  neighbour one row down, one column right, diagonally, 8 and 64 columns right, the two halves of one hash word
  (2q, 2q + 1), neighbouring words (2q + 1, 2q + 2), and the same place under the next seed;
- 2 x 2 blocks: chi-square of the 16 keep patterns of non-overlapping 2 x 2 blocks (aligned to a hash word's
  pair of columns, and shifted by one column) against independent draws (15 degrees of freedom: mean 15,
  99.9% quantile 37.7), averaged over the seeds (an independent mask: 15 +- 5.5 / sqrt(seeds)).
"""

from __future__ import annotations

import argparse
import json

import torch

from rasa_lora.ops import dropout


def previous_keep_mask(rows: int, cols: int, seed: int, p: float) -> torch.Tensor:
    """The definition before session 7: h(i, q) = mix(mix(i + mix(seed)) ^ (q * COLUMN)), both halves used."""
    r = torch.arange(rows, dtype=torch.int64)
    c = torch.arange(cols, dtype=torch.int64)
    hr = dropout.mix_tensor((r + dropout.mix32(seed)) & dropout.MASK32)
    word = dropout.mix_tensor(hr[:, None] ^ (((c >> 1) * dropout.COLUMN) & dropout.MASK32)[None, :])
    return dropout.keep_from_words(word, c, p)


def xor_multiply_keep_mask(rows: int, cols: int, seed: int, p: float) -> torch.Tensor:
    """The rejected candidate: v = (hr_i ^ hc_q) * 0x21F0AAAD, h = v ^ (v >> 16), pre-mixed hr and hc."""
    r = torch.arange(rows, dtype=torch.int64)
    c = torch.arange(cols, dtype=torch.int64)
    hr = dropout.mix_tensor((r + dropout.mix32(seed)) & dropout.MASK32)
    hc = dropout.mix_tensor(((c >> 1) * dropout.COLUMN) & dropout.MASK32)
    word = ((hr[:, None] ^ hc[None, :]) * dropout.M1) & dropout.MASK32
    return dropout.keep_from_words(word ^ (word >> 16), c, p)


def _z_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    r = (a * b).mean() / (a.pow(2).mean() * b.pow(2).mean()).sqrt()
    return float(r * a.numel() ** 0.5)


def block_chi2(mask: torch.Tensor, p: float, shift: int = 0) -> float:
    """Chi-square (15 degrees of freedom) of the 16 keep patterns of the non-overlapping 2 x 2 blocks of `mask`
    (from column `shift` on) against independent draws that keep with probability 1 - effective p. Also used by
    tests/ops/test_dropout_mask.py."""
    m = mask[:, shift:].long()
    rows, cols = m.shape[0] // 2 * 2, m.shape[1] // 2 * 2
    m = m[:rows, :cols]
    pattern = (m[0::2, 0::2] * 8 + m[0::2, 1::2] * 4 + m[1::2, 0::2] * 2 + m[1::2, 1::2]).flatten()
    counts = torch.bincount(pattern, minlength=16).double()
    keep = 1 - dropout.effective_p(p)
    ones = torch.tensor([bin(k).count("1") for k in range(16)], dtype=torch.float64)
    expected = counts.sum() * keep ** ones * (1 - keep) ** (4 - ones)
    return float(((counts - expected) ** 2 / expected).sum())


def stats(make, size: int, seed: int, p: float) -> dict:
    mask = make(size, size, seed, p).double()
    keep = 1 - dropout.effective_p(p)
    n = mask.numel()
    sd = (keep * (1 - keep)) ** 0.5
    rates = [((mask.mean(dim) - keep) / (sd / size ** 0.5)).abs().max().item() for dim in (0, 1)]
    nxt = make(size, size, seed + 1, p).double()
    return {
        "keep_z": float((mask.mean() - keep) / (sd / n ** 0.5)),
        "max_row_col_z": max(rates),
        "corr_z": {
            "row+1": _z_correlation(mask[1:], mask[:-1]),
            "col+1": _z_correlation(mask[:, 1:], mask[:, :-1]),
            "diagonal": _z_correlation(mask[1:, 1:], mask[:-1, :-1]),
            "col+8": _z_correlation(mask[:, 8:], mask[:, :-8]),
            "col+64": _z_correlation(mask[:, 64:], mask[:, :-64]),
            "word halves": _z_correlation(mask[:, 0::2], mask[:, 1::2]),
            "next word": _z_correlation(mask[:, 1:-1:2], mask[:, 2::2]),
            "next seed": _z_correlation(mask, nxt),
            "next seed, row+1": _z_correlation(mask[1:], nxt[:-1]),
        },
        "block_chi2": {"aligned": block_chi2(mask.bool(), p, 0), "shifted": block_chi2(mask.bool(), p, 1)},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seeds", type=int, default=10, help="how many seeds per definition and p")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--ps", default="0.05,0.1,0.5")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    definitions = {"committed": dropout.keep_mask, "previous": previous_keep_mask,
                   "xor-multiply": xor_multiply_keep_mask}
    result = {}
    print(f"{args.size} x {args.size} masks, {args.seeds} seeds each. For an independent mask: keep z and correlation "
          f"z ~N(0, 1) (rms 1), 2x2 chi2 mean 15 +- {5.48 / args.seeds ** 0.5:.1f}")
    for name, make in definitions.items():
        for p in (float(v) for v in args.ps.split(",")):
            rows = [stats(make, args.size, args.first_seed + seed, p) for seed in range(args.seeds)]
            result[f"{name} p={p}"] = rows
            zs = [z for row in rows for z in row["corr_z"].values()]
            keep = [row["keep_z"] for row in rows]
            aligned = [row["block_chi2"]["aligned"] for row in rows]
            shifted = [row["block_chi2"]["shifted"] for row in rows]
            mean_aligned, mean_shifted = sum(aligned) / len(aligned), sum(shifted) / len(shifted)
            print(f"{name:<12} p={p:<4}  keep z rms {_rms(keep):4.2f}  correlation z rms {_rms(zs):4.2f} "
                  f"(max |z| {max(map(abs, zs)):4.2f} of {len(zs)})  2x2 chi2 mean {mean_aligned:5.1f} "
                  f"aligned, {mean_shifted:5.1f} shifted (max {max(aligned + shifted):5.1f})", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


def _rms(values) -> float:
    return (sum(v * v for v in values) / len(values)) ** 0.5


if __name__ == "__main__":
    main()
