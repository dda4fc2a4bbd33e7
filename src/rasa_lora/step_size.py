"""How far one optimizer step moves a layer's update dW_i, for LoRA and for RaSA's eq. 6 init, and the alpha that
makes RaSA's step equal LoRA's (docs/training.md, "RaSA's alpha against LoRA's").

Under a sign-like optimizer (decoupled LionW, the paper's) every trainable entry moves by +-lr a step whatever its
gradient, so the size of dW_i's step is set by the scale each rank carries. B starts at zero, so the first step is
that of B alone, and with random rows of A the contributions of the ranks add in squares: the Frobenius norm of the
step goes with sqrt(sum of the squared rank scales), as long as the ranks (r-k+Lk for RaSA) are few against the
layer's input width (docs/training.md gives the measured error when they are not).

- LoRA: alpha/r on each of r ranks, so alpha / sqrt(r).
- RaSA (eq. 6): D_i = alpha/(2(r-k)) on the r-k private ranks and alpha/(2Lk) on the L*k pooled ones, so
  (alpha/2) * sqrt(1/(r-k) + 1/(Lk)); k = 0 gives alpha/(2r) on r ranks, k = r has no private term.

`update_scale` returns that quantity (proportional to the step's size; only ratios mean something); `step_ratio`
is RaSA's over LoRA's at the same r and alpha (0.594 at r = 8, k = 1, L = 30) and `matched_alpha` the alpha that
equalizes them. The measurements behind the rule (LionW only; Adam's sign-like steady state is not measured) are in
docs/replication.md, "Why RaSA trains slower here", and docs/training.md. Imports nothing heavy.
"""

from __future__ import annotations

import math
import operator

METHODS = ("lora", "rasa")


def _default_k(r: int) -> int:
    """The paper's k = max(r / 8, 1), as `rasa_lora.adapter.default_rasa_k` (not imported: that pulls in PEFT)."""
    return max(r // 8, 1)


def _whole(name: str, value, low: int, high: int | None = None, hint: str = "") -> int:
    """`value` as an int in low..high (numpy integers accepted, bools and floats refused), else a ValueError."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bounds = f"{low} <= {name} <= {high}" if high is not None else f"{name} >= {low}"
        raise ValueError(f"{name}={value!r} must be an integer with {bounds}{hint}")
    return number


def update_scale(method: str, r: int, alpha: float, k: int | None = None, num_layers: int | None = None) -> float:
    """How far one sign-like (LionW) step moves dW_i at init, up to a factor shared by both methods: LoRA
    alpha / sqrt(r), RaSA (alpha/2) * sqrt(1/(r-k) + 1/(L k)) with L = `num_layers`, the layers whose k ranks form
    the pool (a model's decoder layers when every layer is adapted). `k` (RaSA only) None means max(r // 8, 1);
    `num_layers` is needed only for RaSA with k > 0."""
    if method not in METHODS:
        raise ValueError(f"no update-size rule for method {method!r}; choose one of {', '.join(METHODS)}")
    r = _whole("r", r, 1)
    if not 0 < alpha < math.inf:
        raise ValueError(f"alpha={alpha!r} must be a positive number")
    if method == "lora":
        if k is not None:
            raise ValueError("k is RaSA's shared ranks; LoRA has none (leave k=None)")
        return alpha / math.sqrt(r)
    k = _default_k(r) if k is None else _whole("k", k, 0, r)
    if k == 0:  # no pool: eq. 6 gives alpha/(2r) on each of the r private ranks
        return alpha / 2 / math.sqrt(r)
    num_layers = _whole("num_layers", num_layers, 1, hint=": RaSA with k > 0 needs the number of layers sharing "
                        "the pool (e.g. the model's num_hidden_layers)")
    private = 1 / (r - k) if r > k else 0.0
    return alpha / 2 * math.sqrt(private + 1 / (num_layers * k))


def step_ratio(r: int, k: int | None = None, num_layers: int | None = None) -> float:
    """RaSA's step over LoRA's at the same r and alpha (alpha cancels): 0.594 at r = 8, k = 1, L = 30."""
    return update_scale("rasa", r, 1.0, k, num_layers) / update_scale("lora", r, 1.0)


def matched_alpha(method: str, r: int, alpha: float, k: int | None = None, num_layers: int | None = None) -> float:
    """The alpha of the other method (RaSA for "lora", LoRA for "rasa") whose step equals `method`'s at `alpha`, both
    at rank r; `k` and `num_layers` are RaSA's. `matched_alpha("lora", 8, 9.5, k=1, num_layers=30)` is RaSA's
    16.0 (to 0.1%), `matched_alpha("rasa", 8, 16, k=1, num_layers=30)` LoRA's 9.5."""
    update_scale(method, r, alpha, k if method == "rasa" else None, num_layers)  # checks every argument
    ratio = step_ratio(r, k, num_layers)  # RaSA's step over LoRA's; the step is linear in alpha
    return alpha / ratio if method == "lora" else alpha * ratio
