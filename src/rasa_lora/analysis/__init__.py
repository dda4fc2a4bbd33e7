"""Reconstruction-error analysis of LoRA and RaSA (paper Sec. 3, App. A) and `compress`.

`reconstruction` holds the mathematics (torch only); `sources` turns checkpoints, adapters or a seeded
generator into groups of weight deltas; `plots` draws Figures 2 and 3; `compress` writes a RaSA adapter
fitted to a full fine-tune; `cli` holds `rasa-lora analyze` and `rasa-lora compress`.
"""

__all__ = [
    "FitResult", "LoraSolution", "RasaFactors", "check_group", "fit_rasa", "k_sweep", "lora_solution",
    "rasa_error", "theorem_factors",
]


def __getattr__(name: str):
    # Lazy, so that `rasa-lora analyze --help` (which imports this package) does not import torch.
    if name in __all__:
        from rasa_lora.analysis import reconstruction

        return getattr(reconstruction, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
