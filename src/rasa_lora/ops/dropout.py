r"""The adapter's dropout mask: a counter-based hash of (seed, row, column), never stored. The one definition for
every path (docs/performance.md, record 10): the reference path, the "torch" and "cublas" backends
(`dropout_mask`, or the Triton kernel that draws the same bits) and the Triton kernels, which draw it in registers.

The layer drops adapter-input elements with probability p. For row i and the pair of columns
(2q, 2q+1) it draws one 32-bit word, the product of an (odd) hash of the row and an (odd) hash of the pair,

    v = (mix(i + S) | 1) * (mix((q * 0x61C88647) ^ S) | 1)        (mod 2**32),  S = mix(seed)
    h(i, q) = v ^ (v >> 16)

and keeps column 2q when the low 16 bits of h are >= t, column 2q+1 when the high 16 bits are, with
t = round(p * 2**16): so p is used rounded to a multiple of 2**-16 (`effective_p`: 0.05 -> 0.0500031), and the
kept values are scaled by 1/(1 - effective_p). `mix` is a two-multiply 32-bit integer hash (constants from
C. Wellons' hash-prospector, bias ~0.11; every step is a bijection of 32-bit words). Each keep decision is a
pure function of (seed, i, column), so the forward pass, gradient checkpointing's recomputed forward and the
backward pass draw the same mask without saving it, and the Triton kernels (`kernels.py`) draw it inside their
products, in registers: the row and pair hashes are computed once per row and per column pair of a tile, so a
word of two elements costs a multiply, an xorshift and the split into halves, then a comparison each. Philox
(`tl.rand`, torch's dropout) costs several times that, a stored mask a pass over memory.

The word's statistics were chosen by `benchmarks/experiments/mask_quality.py` (docs/performance.md, record 4).
Both hashes depend on the seed, so whatever relation the product leaves between two given rows or two given columns
changes from call to call. Making the hashes odd costs each row and pair one bit: two rows whose hashes differ
only in the lowest bit share their mask (probability 2**-31 a pair and call).

This is a hash, not Philox; what dropout needs from it is tested in `tests/ops/test_dropout_mask.py`: the keep
rate, independence of neighbouring rows and columns (also the two halves of one word), and of seeds.
`keep_mask` below is the PyTorch twin of the kernels' `_keep` (bit-identical; tested on the GPU).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
M1, M2, COLUMN = 0x21F0AAAD, 0x735A2D97, 0x61C88647  # all below 2**31, so Triton keeps them 32-bit


def mix32(v: int) -> int:
    """The 32-bit mix on a Python int (host side, for the seed)."""
    v &= MASK32
    v ^= v >> 16
    v = (v * M1) & MASK32
    v ^= v >> 15
    v = (v * M2) & MASK32
    v ^= v >> 15
    return v


def mix_tensor(v: torch.Tensor) -> torch.Tensor:
    """The same mix on an int64 tensor holding 32-bit values (products wrap; the low 32 bits are kept)."""
    v = v ^ (v >> 16)
    v = (v * M1) & MASK32
    v = v ^ (v >> 15)
    v = (v * M2) & MASK32
    return v ^ (v >> 15)


def threshold(p: float) -> int:
    """The 16-bit threshold t: an element is dropped when its 16 hash bits are below t."""
    return min(int(round(p * 2**16)), 2**16)


def effective_p(p: float) -> float:
    """The dropout probability the mask really has: p rounded to a multiple of 2**-16."""
    return threshold(p) / 2**16


def seed_hash(seed: int) -> int:
    """mix(seed), as the signed 32-bit int the kernels take."""
    h = mix32(seed)
    return h - 2**32 if h >= 2**31 else h


def keep_mask(rows: int, cols: int, seed, p: float, device=None, row_offset: int = 0) -> torch.Tensor:
    """The (rows, cols) bool keep-mask of dropout probability p for this seed (True = kept). `seed`: a Python int,
    or a one-element int32 tensor on `device` holding it (the device-side seed of `call_seed_tensor`; no host sync).

    One word per column pair, as the kernels draw it: with v = hr * hc (the low 32 bits of the int64 product),
    h = v ^ (v >> 16) has v's high half as its high half (the odd column's bits) and v's low half ^ high half as
    its low half (the even column's); working on pairs halves the token-sized integer work."""
    seed_h = mix_tensor(seed.reshape(()).long() & MASK32) if isinstance(seed, torch.Tensor) else mix32(seed)
    r = torch.arange(row_offset, row_offset + rows, device=device, dtype=torch.int64)
    q = torch.arange((cols + 1) // 2, device=device, dtype=torch.int64)
    hr = mix_tensor((r + seed_h) & MASK32) | 1
    hc = mix_tensor(((q * COLUMN) & MASK32) ^ seed_h) | 1
    word = hr[:, None] * hc[None, :]  # wraps mod 2**64: bits 0-31 are v
    high = (word >> 16).bitwise_and_(0xFFFF)
    t = threshold(p)
    if torch.compiler.is_compiling():  # traced (the reference path under torch.compile): no `out=` into a view
        low = word.bitwise_and(0xFFFF).bitwise_xor(high)
        return torch.stack([low >= t, high >= t], dim=-1).view(rows, -1)[:, :cols]
    keep = torch.empty(rows, q.numel(), 2, dtype=torch.bool, device=device)
    torch.ge(word.bitwise_and_(0xFFFF).bitwise_xor_(high), t, out=keep[..., 0])
    torch.ge(high, t, out=keep[..., 1])
    return keep.view(rows, -1)[:, :cols]


def keep_from_words(words: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Keep decisions from the (rows, cols) hash words of each element's column pair: column c keeps when the low
    (even c) or high (odd c) 16 bits of its word are >= the threshold of p."""
    bits = torch.where((cols & 1).bool()[None, :], words >> 16, words & 0xFFFF)
    return bits >= threshold(p)


def scale(p: float) -> float:
    """The dropout scale 1 / (1 - p), with p as the mask has it (`effective_p`)."""
    return 1.0 / (1.0 - effective_p(p))


def dropout_mask(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """The keep-mask (bool, shape of x) of input x: rows are x's leading dims flattened, as every path flattens them."""
    cols = x.shape[-1]
    rows = x.numel() // max(cols, 1)
    return keep_mask(rows, cols, seed, p, x.device).reshape(x.shape)


# --- the seed on the device ----------------------------------------------------------------------------------
# A captured CUDA graph (or a compiled graph) replays the same host values each step, so a seed drawn on the host
# would give the same mask every step. There the seed of a call is derived on the device from a state tensor
# [seed, counter] (int64, on the model's device; `state_tensor`) and the layer's fixed stream number (its index
# among the model's RaSA layers), and the counter is advanced on the device once per forward of the model
# (`advance`), so every replay draws fresh masks, while a checkpointed recomputation, which runs inside the same
# forward's backward, reads the same counter and draws the forward's mask. `call_seed` is the host twin: the mask
# of (seed, counter, stream) is `keep_mask(..., call_seed(seed, counter, stream), ...)`, the one of every path.
SEED_BITS = 0x7FFFFFFF
# A mask seed on the device is int32, not int64: under CUDA graphs inductor reused the 8-byte int64 philox offset of
# SDPA's efficient attention, a CPU tensor in the warm-up run, for an int64 seed (docs/performance.md, "CPU buffer")
SEED_DTYPE = torch.int32


def seed_as_int32(seed):
    """A seed's low 32 bits as the signed int32 value holding them (the kernels and `keep_mask` use those bits): of a
    Python int, or elementwise of an int64 tensor."""
    return ((seed & MASK32) ^ 2**31) - 2**31


def call_seed(seed: int, counter: int, stream: int) -> int:
    """The mask seed (31 bits) of stream `stream` at this counter, for the model seed `seed` (host side)."""
    v = mix32((seed & MASK32) ^ mix32(counter & MASK32))
    return mix32((v + stream * COLUMN) & MASK32) & SEED_BITS


def call_seed_tensor(state: torch.Tensor, stream: int) -> torch.Tensor:
    """`call_seed(state[0], state[1], stream)` computed on state's device: a one-element int32 tensor (`SEED_DTYPE`)."""
    seed, counter = state[0:1], state[1:2]
    v = mix_tensor((seed & MASK32) ^ mix_tensor(counter & MASK32))
    return (mix_tensor((v + (stream * COLUMN) % 2**32) & MASK32) & SEED_BITS).to(SEED_DTYPE)


def state_tensor(seed: int = 0, counter: int = 0, device=None) -> torch.Tensor:
    """A device seed state [seed, counter] (int64)."""
    return torch.tensor([seed, counter], dtype=torch.int64, device=device)


def advance(state: torch.Tensor, steps: int = 1) -> None:
    """Advance the state's counter on its device (in place; no host sync, captured by a CUDA graph)."""
    with torch.no_grad():
        state[1:2].add_(steps)


# The device seed states, one a device: [seed, counter], the seed drawn from torch's default CPU generator on first
# use (so `torch.manual_seed` sets it), the counter advanced once per forward of a RaSA model (the tuner's forward
# pre-hook) while `rasa_lora.settings.DEVICE_SEED` is on or under torch.compile.
STATES: dict[str, torch.Tensor] = {}


def device_state(device) -> torch.Tensor:
    """The seed state of `device` (made on first use)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and the tensors' "cuda:0": one state
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    state = STATES.get(key)
    if state is None:
        # drawn and kept as tensors (no `int(...)`): a first call under torch.compile is traced without a break
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        state = STATES[key] = torch.cat([seed, torch.zeros_like(seed)]).to(device)
    return state


def reseed(device) -> torch.Tensor:
    """Start `device`'s seed state afresh, in place: a seed drawn from torch's default CPU generator, counter 0 (a
    training run's start: runs in one process draw the same masks for the same `torch.manual_seed`)."""
    state = device_state(device)
    with torch.no_grad():
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        state.copy_(torch.cat([seed, torch.zeros_like(seed)]))
    return state


def advance_all(steps: int = 1) -> None:
    """Advance the counter of every device seed state."""
    for state in STATES.values():
        advance(state, steps)


def get_states() -> dict[str, list[int]]:
    """The device seed states as plain ints ({device: [seed, counter]}), for a training checkpoint."""
    return {key: [int(v) for v in state.tolist()] for key, state in STATES.items()}


def set_states(states: dict[str, list[int]]) -> None:
    """Restore `get_states()`'s values, in place where a state exists (a captured graph keeps its address)."""
    for key, (seed, counter) in states.items():
        state = STATES.get(key)
        if state is None:
            STATES[key] = state_tensor(seed, counter, key)
        else:
            with torch.no_grad():
                state.copy_(torch.tensor([seed, counter], dtype=torch.int64))
