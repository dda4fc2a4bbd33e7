"""The bandwidth floor of the adapter's kernels in a training step: bytes they must move, and the time that takes.

    python3 benchmarks/experiments/floor.py [--tokens 16384] [--read-tbs 3.5] [--write-tbs 3.3] [--layers 32]

Counts, for one Llama-3.1-8B-shaped decoder layer, the passes our fused path makes over token-sized bf16 tensors
in a training step with dropout, u kept across gradient checkpointing and the base GEMMs adding into the
adapter's terms (the default): reads of each projection's input in `down` (forward) and `ga` (dA), a write of its
dL/dx part, a write of its output term in `up_` in the forward and again in checkpointing's recomputation (not for
the block's last projection, down_proj, whose forward is not recomputed), a read of its output gradient in
`bwd_up`. The bandwidths default to PyTorch's own read and write of such tensors on one H200 (`benchmarks/RESULTS.md`,
session 6, run A). With --grouped, q/k/v and gate/up share their input passes (`benchmarks/grouped.py`).
Arithmetic only: no GPU needed.
"""

from __future__ import annotations

import argparse

# projection: (input width, output width, recomputed under checkpointing)
LLAMA_8B = {"q": (4096, 4096, True), "k": (4096, 1024, True), "v": (4096, 1024, True), "o": (4096, 4096, True),
            "gate": (4096, 14336, True), "up": (4096, 14336, True), "down": (14336, 4096, False)}
GROUPS = (("q", "k", "v"), ("gate", "up"))


def layer_bytes(tokens: int, grouped: bool = False, itemsize: int = 2) -> tuple[int, int]:
    """(bytes read, bytes written) by the adapter's token-sized passes in one decoder layer's training step."""
    shared = {m for group in GROUPS for m in group[1:]} if grouped else set()
    inputs = sum(k for name, (k, _, _) in LLAMA_8B.items() if name not in shared)
    outputs = sum(n for _, n, _ in LLAMA_8B.values())
    recomputed = sum(n for _, n, again in LLAMA_8B.values() if again)
    read = 2 * inputs + outputs       # down and ga read x; bwd_up reads dL/dy
    written = inputs + outputs + recomputed  # the dL/dx part; up_ in the forward and in the recomputation
    return tokens * read * itemsize, tokens * written * itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--read-tbs", type=float, default=3.5)
    parser.add_argument("--write-tbs", type=float, default=3.3)
    parser.add_argument("--grouped", action="store_true")
    args = parser.parse_args()
    read, written = layer_bytes(args.tokens, args.grouped)
    ms = (read / args.read_tbs + written / args.write_tbs) / 1e9
    print(f"{args.tokens} tokens{' (grouped)' if args.grouped else ''}: a layer reads {read / 1e9:.2f} GB and writes "
          f"{written / 1e9:.2f} GB; at {args.read_tbs} / {args.write_tbs} TB/s {ms:.2f} ms a layer, "
          f"{ms * args.layers:.1f} ms a {args.layers}-layer step")


if __name__ == "__main__":
    main()
