"""The two figures of the analysis, drawn from `analysis.json`'s group records (matplotlib, Agg backend).

- `plot_convergence`: the paper's Figure 2, RaSA's relative error per coordinate-descent iteration with LoRA's
  minimum (eq. 9) as a dashed line, one panel per group; the curves of the starts that lost (`starts`) in grey.
- `plot_k_sweep`: the paper's Figure 3, RaSA's final relative error against k (k = 0 is LoRA), one panel per group.
Errors are shown relative to sum_i ||M_i||^2 so that groups of different scale share one axis style.
"""

from __future__ import annotations

import math
from pathlib import Path


def _panels(count: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, max(count, 1))
    rows = math.ceil(max(count, 1) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return plt, figure, list(axes.flat)


def _short(name: str) -> str:
    """`model.layers.*.self_attn.q_proj` -> `self_attn.q_proj`."""
    return name.split("*.", 1)[-1]


def _label_panel(axis, name: str, lora_level: float, lora_label: str, xlabel: str) -> None:
    """LoRA's minimum as a dashed line, the group as the title, the axis labels and the legend."""
    axis.axhline(lora_level, color="tab:red", linestyle="--", label=lora_label)
    axis.set_title(_short(name), fontsize=9)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("relative error")
    axis.legend(fontsize=7)


def _save(plt, figure, title: str, path: str | Path) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_convergence(groups: dict[str, dict], path: str | Path) -> Path:
    """Figure 2: per group, `rasa_error_curve` (relative) against the iteration, and LoRA's minimum."""
    plt, figure, axes = _panels(len(groups))
    for axis, (name, record) in zip(axes, groups.items(), strict=False):
        total = record["total_energy"] or 1.0
        curve = [record["rasa_initial_error"] / total] + [e / total for e in record["rasa_error_curve"]]
        others = [start for start in record.get("starts", []) if start["error_curve"] != record["rasa_error_curve"]]
        for number, start in enumerate(others):  # the starts that lost, thin and grey
            other = [start["initial_error"] / total] + [e / total for e in start["error_curve"]]
            axis.plot(range(len(other)), other, color="0.6", linewidth=0.8,
                      label="other starts" if number == 0 else None)
        start = f", {record['rasa_start']} start" if record.get("rasa_start") else ""
        axis.plot(range(len(curve)), curve, marker="." if len(curve) <= 40 else None,
                  label=f"RaSA (r={record['r']}, k={record['k']}{start})")
        _label_panel(axis, name, record["lora_error"] / total, f"LoRA min (r={record['r']})", "iteration")
        low = min(curve[1:] + [record["lora_error"] / total]) if len(curve) > 1 else curve[0]
        high = max(curve[1:2] + [record["lora_error"] / total])
        axis.set_ylim(low - 0.1 * (high - low + 1e-12), high + 0.3 * (high - low + 1e-12))
    return _save(plt, figure, "Reconstruction error during coordinate descent (paper Fig. 2)", path)


def plot_k_sweep(groups: dict[str, dict], path: str | Path) -> Path:
    """Figure 3: per group, the final relative error for each k of `k_sweep`, LoRA's minimum dashed."""
    plt, figure, axes = _panels(len(groups))
    for axis, (name, record) in zip(axes, groups.items(), strict=False):
        total = record["total_energy"] or 1.0
        ks = sorted(int(k) for k in record["k_sweep"])
        axis.plot(ks, [record["k_sweep"][str(k)] / total for k in ks], marker="o", label="RaSA")
        _label_panel(axis, name, record["lora_error"] / total, "LoRA min", "k (shared ranks per layer)")
    return _save(plt, figure, "Final reconstruction error against k (paper Fig. 3)", path)
