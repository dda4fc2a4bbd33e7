"""The training recipe: one typed dataclass holding every key, YAML loading and `--key value` overrides.

Keys follow the names users know from axolotl, LLaMA-Factory and litgpt (`base_model`, `dataset`, `r`, `alpha`,
`learning_rate`, `global_batch_size`, `micro_batch_size`, `epochs`, `max_steps`, `cutoff_len`, ...). The defaults
are the paper's recipe (App. C and the authors' scripts, see NOTES.md): decoupled LionW with betas (0.9, 0.95),
lr 5e-4, weight decay 0, cosine schedule with 10% warmup, global batch 192, 8 epochs, bf16 where the hardware has
it, gradient checkpointing (non-reentrant), samples grouped by length, loss on the response only, all seven
projections, dropout 0.05, k = r/8.

Choices: a key the dataclass does not declare is an error listing the valid keys (a typo must not silently train
with a default). Command-line values are parsed as YAML scalars (`--r 16`, `--target-modules q_proj,v_proj`,
`--bf16 false`), and dashes in keys are accepted for underscores. Checks that need no model or data run in
`__post_init__`, so a bad recipe fails before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rasa_lora.models import LLAMA_PROJECTIONS

METHODS = ("rasa", "lora", "vera", "adalora", "olora", "dora", "pissa", "mora", "prilora", "fft")
# method -> why it cannot run yet (none at present; the check stays for methods announced before they land)
UNSUPPORTED_METHODS: dict[str, str] = {}
# OLoRA and PiSSA move the base weights; their final adapter is converted against the initial one
CONVERTED_ON_SAVE = ("olora", "pissa")
DATASET_FORMATS = ("auto", "arithmetic", "gsm8k", "math", "metamathqa", "magicoder", "alpaca", "completion")
ALL_PROJECTIONS = LLAMA_PROJECTIONS

# The paper's micro-batch; the default one is the largest divisor of global_batch_size not above it.
DEFAULT_MICRO_BATCH = 3

# Keys that only change how a run is operated, not what it computes; they may differ when resuming.
OPERATIONAL_KEYS = ("resume", "overwrite", "save_steps", "save_total_limit", "save_epoch_adapters", "logging_steps",
                    "progress_bar", "eval_steps", "eval_batch_size", "report_to")


@dataclass
class TrainConfig:
    base_model: str | None = None
    """Hub name, local checkpoint directory or .gguf file; None (or "smollm2") is the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer source; None takes the base model's."""
    dataset: str | None = None
    """Local file (.jsonl/.json/.parquet/.csv) or hub dataset name; None is the built-in arithmetic generator."""
    dataset_format: str = "auto"
    """One of DATASET_FORMATS; "auto" picks it from the fields of the first record."""
    dataset_split: str = "train"
    """Split to read when `dataset` is a hub name."""
    dataset_fraction: float = 1.0
    """Fraction of the examples kept, a seeded random subset (the paper's 25% / 50% runs)."""
    val_set_size: float = 0.0
    """Held-out part of the training data for the held-out loss: a fraction below 1 or a count from 1 on; drawn
    with a fixed seed, the same for every `seed`, and never trained on. 0: none (unless eval_dataset is given)."""
    eval_dataset: str | None = None
    """Held-out set for the held-out loss instead of val_set_size: a file or hub name (its `test` split), read in
    dataset_format."""
    eval_steps: int = 0
    """Held-out loss every this many optimizer steps; 0: before training, after each epoch and at the end."""
    eval_batch_size: int | None = None
    """Examples per forward pass of the held-out loss; None takes micro_batch_size."""
    num_examples: int = 2000
    """Size of the built-in arithmetic training set (ignored for other datasets)."""
    arithmetic_steps: int = 2
    """Operations per built-in arithmetic problem (1 to 4); more is harder."""
    arithmetic_max_value: int = 20
    """Largest starting quantity in a built-in arithmetic problem; larger is harder."""
    method: str = "rasa"
    """One of METHODS: rasa, lora, vera, adalora, olora, dora, pissa, mora, prilora, fft (full fine-tuning)."""
    r: int = 8
    """Adapter rank (VeRA: the rank of its shared random matrices; the paper uses 1024)."""
    rasa_k: int | None = None
    """Ranks each RaSA layer gives to the shared pool; None: the paper's default (`RasaConfig`'s, max(1, r // 8))."""
    mora_type: int = 6
    """MoRA's compression/decompression (official numbering): 1-4 share rows/columns, 6 rotates (the default)."""
    prilora_prune_ratio: float = 0.5
    """PriLoRA: fraction of each row of A zeroed at each pruning step."""
    prilora_prune_interval: int = 10
    """PriLoRA: prune every this many optimizer steps (0: never)."""
    alpha: float = 32.0
    """Scaling numerator (LoRA family: alpha / r; RaSA: folded into D's initial value)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Names of the linear modules to adapt; default: all seven projections of a Llama-style block."""
    target_parameters: list[str] = field(default_factory=list)
    """3-D expert parameters to adapt (rasa and lora only), e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj for
    Mixtral in transformers >= 5 (docs/big_models.md); no dropout reaches them."""
    base_quantization: str = "none"
    """"none", or "nf4": a frozen 4-bit NF4 base (bitsandbytes; QRaSA / QLoRA, `rasa_lora.quant`): loaded 4-bit on a
    GPU, quantized after loading on a CPU; needs `pip install rasa-lora[quant]`."""
    learning_rate: float = 5e-4
    """Peak learning rate."""
    optimizer: str = "lionw"
    """"lionw" (decoupled LionW, MosaicML semantics) or "adamw" (torch.optim.AdamW)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Optimizer betas (the authors' scripts use 0.9 / 0.95 for LionW)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    max_grad_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off (the paper does not clip)."""
    lr_scheduler: str = "cosine"
    """"cosine" (to 0) or "constant", both after a linear warmup."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent in linear warmup."""
    global_batch_size: int = 192
    """Examples per optimizer step, reached by gradient accumulation."""
    micro_batch_size: int | None = None
    """Examples per forward pass; must divide global_batch_size. Unset: the largest divisor of global_batch_size
    not above 3 (the paper's micro-batch), e.g. 3 for 192, 2 for 8."""
    epochs: float = 8.0
    """Passes over the data (fractions allowed); ignored when max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    cutoff_len: int = 4096
    """Longest tokenized example; longer ones are truncated from the right (response tokens dropped first)."""
    seed: int = 42
    """Seeds the adapter init, dropout, data subset and data order."""
    bf16: str = "auto"
    """"auto" (bf16 autocast on a GPU that supports it), "true" or "false"."""
    model_dtype: str = "auto"
    """Dtype of the frozen base weights: "auto" (bfloat16 on a GPU with bf16, else float32), "float32", "bfloat16"."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory."""
    use_reentrant: bool = False
    """Reentrant checkpointing; off by default (shared parameters need the non-reentrant form, NOTES.md)."""
    group_by_length: bool = True
    """Arrange each global batch's examples into micro-batches of similar length (less padding)."""
    pad_to_multiple_of: int = 0
    """Pad each micro-batch's length up to a multiple of this (0: to its longest example): fewer distinct shapes,
    so fewer recompilations with `compile` and static shapes for CUDA graphs (compile_mode: reduce-overhead)."""
    compile: bool = False
    """torch.compile the model; RaSA layers are traced through their registered operators (`rasa_lora.ops.registered`),
    dropout masks seeded on the device. Off by default: a model's step is faster compiled (benchmarks/RESULTS.md),
    but the trainer's tokens/s and the gradients under CUDA graphs with checkpointing are unchecked
    (docs/performance.md)."""
    compile_backend: str = "inductor"
    """torch.compile's backend with `compile`: "inductor" (generated kernels) or "aot_eager" (traced, then run
    eagerly: for debugging a compile problem)."""
    compile_mode: str = "default"
    """torch.compile's mode with the inductor backend: "default", "reduce-overhead" (CUDA graphs: a CUDA device,
    `pad_to_multiple_of` > 0 so micro-batch shapes repeat; with gradient checkpointing its GPU test failed on a
    PyTorch buffer reuse, worked around since and not yet re-run: docs/performance.md, "CPU buffer") or
    "max-autotune"."""
    output_dir: str = "runs/rasa"
    """Where the adapter, metrics, plot and checkpoints go."""
    logging_steps: int = 1
    """Write a metrics row every this many optimizer steps."""
    save_steps: int = 0
    """Write a checkpoint every this many optimizer steps; 0 saves only on interruption."""
    save_total_limit: int = 2
    """Checkpoints kept (the newest ones)."""
    save_epoch_adapters: bool = False
    """Also keep the adapter after each whole epoch, in output_dir/epochs/epoch-N (the paper's BEST column and
    forgetting curves: `rasa-lora reproduce --every-epoch`); not for fft, olora, pissa."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    overwrite: bool = False
    """Delete an existing output_dir and start afresh."""
    progress_bar: bool = True
    """Show a tqdm bar with loss, lr and tokens/s."""
    report_to: str = "none"
    """Also log metrics.jsonl's rows to a tracker: "tensorboard" (event files in output_dir/tensorboard), "trackio",
    "wandb" or "none" (through accelerate's trackers; `rasa_lora.train.tracking`)."""

    def __post_init__(self) -> None:
        if self.micro_batch_size is None and isinstance(self.global_batch_size, int) and self.global_batch_size > 0:
            self.micro_batch_size = default_micro_batch(self.global_batch_size)
        self._check_method()
        self._check_numbers()
        self._check_choices()
        if isinstance(self.target_modules, str):
            self.target_modules = [name.strip() for name in self.target_modules.split(",") if name.strip()]
        if isinstance(self.target_parameters, str):
            self.target_parameters = [name.strip() for name in self.target_parameters.split(",") if name.strip()]
        self.target_parameters = list(self.target_parameters or [])
        if self.target_parameters and self.method not in ("rasa", "lora"):
            raise ValueError(f"target_parameters (expert stacks) work with method rasa or lora, not {self.method!r}; "
                             "remove target_parameters or choose rasa/lora")
        if self.target_parameters and self.method == "lora" and self.dropout:
            raise ValueError(f"dropout={self.dropout} with target_parameters: PEFT's LoRA refuses dropout on expert "
                             "parameters; set dropout: 0.0")
        if not self.target_modules and self.method != "fft":
            raise ValueError("target_modules is empty; name at least one module, e.g. q_proj,v_proj")

    def _check_method(self) -> None:
        if self.method in UNSUPPORTED_METHODS:
            raise NotImplementedError(
                f"method={self.method!r} is not yet supported: {UNSUPPORTED_METHODS[self.method]}. "
                f"Choose one of: {', '.join(METHODS)}."
            )
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of: {', '.join(METHODS)}")
        if self.method == "rasa" and self.rasa_k is not None:
            self.shared_ranks  # noqa: B018 - RasaConfig's checks, now rather than when the model is built
        if self.method == "mora":
            from rasa_lora.baselines.mora.config import MORA_TYPES

            if self.mora_type not in MORA_TYPES:
                choices = ", ".join(map(str, MORA_TYPES))
                raise ValueError(f"mora_type={self.mora_type!r} is unknown; choose one of: {choices}")
        if self.method == "prilora" and not (0 <= self.prilora_prune_ratio < 1 and self.prilora_prune_interval >= 0):
            raise ValueError(f"prilora_prune_ratio={self.prilora_prune_ratio} must be in [0, 1) and "
                             f"prilora_prune_interval={self.prilora_prune_interval} >= 0 (0 turns pruning off)")

    def _check_numbers(self) -> None:
        positive = {"r": self.r, "learning_rate": self.learning_rate, "global_batch_size": self.global_batch_size,
                    "micro_batch_size": self.micro_batch_size, "cutoff_len": self.cutoff_len,
                    "num_examples": self.num_examples, "logging_steps": self.logging_steps}
        for key, value in positive.items():
            if not value > 0:
                raise ValueError(f"{key}={value} must be positive")
        if not (isinstance(self.pad_to_multiple_of, int) and self.pad_to_multiple_of >= 0):
            raise ValueError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} must be a whole number >= 0 "
                             "(0: no rounding)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} does not divide global_batch_size={self.global_batch_size}; "
                "choose a divisor so that gradient accumulation reaches the global batch exactly"
            )
        if not 0 < self.dataset_fraction <= 1:
            raise ValueError(f"dataset_fraction={self.dataset_fraction} must be in (0, 1]")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps={self.max_steps} must be positive (or leave it unset to use epochs)")
        if self.max_steps is None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs={self.epochs} must be positive when max_steps is unset")
        if not 1 <= self.arithmetic_steps <= 4:
            raise ValueError(f"arithmetic_steps={self.arithmetic_steps} must be between 1 and 4")
        if self.arithmetic_max_value < 2:
            raise ValueError(f"arithmetic_max_value={self.arithmetic_max_value} must be at least 2")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas} must be two numbers in [0, 1), e.g. 0.9,0.95")
        if self.val_set_size < 0 or (self.val_set_size > 1 and self.val_set_size != int(self.val_set_size)):
            raise ValueError(f"val_set_size={self.val_set_size} must be a fraction in [0, 1) or a whole count")
        if self.val_set_size and self.eval_dataset:
            raise ValueError("val_set_size and eval_dataset both name a held-out set; give one of them")
        if self.eval_steps < 0 or (self.eval_batch_size is not None and self.eval_batch_size <= 0):
            raise ValueError(f"eval_steps={self.eval_steps} must be >= 0 and eval_batch_size={self.eval_batch_size} "
                             "positive (or unset)")
        if self.save_steps < 0 or self.save_total_limit < 1:
            raise ValueError(f"save_steps={self.save_steps} must be >= 0 and "
                             f"save_total_limit={self.save_total_limit} >= 1")

    def _check_choices(self) -> None:
        choices = {"optimizer": ("lionw", "adamw"), "lr_scheduler": ("cosine", "constant"),
                   "bf16": ("auto", "true", "false"),
                   "model_dtype": ("auto", "float32", "bfloat16"), "dataset_format": DATASET_FORMATS,
                   "base_quantization": ("none", "nf4"), "compile_backend": ("inductor", "aot_eager"),
                   "compile_mode": ("default", "reduce-overhead", "max-autotune"),
                   "report_to": ("none", "tensorboard", "trackio", "wandb")}
        self.bf16 = str(self.bf16).lower()
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is unknown; choose one of: {', '.join(allowed)}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other; give one of them")
        if self.compile and self.compile_mode == "reduce-overhead":
            if self.compile_backend != "inductor":
                raise ValueError(f"compile_mode=reduce-overhead is inductor's (CUDA graphs), not "
                                 f"compile_backend={self.compile_backend!r}: set compile_backend: inductor")
            if not self.pad_to_multiple_of:
                raise ValueError("compile_mode=reduce-overhead records a CUDA graph for every micro-batch shape: set "
                                 "pad_to_multiple_of (e.g. 64) so that shapes repeat")
        if self.method == "fft" and self.base_quantization != "none":
            raise ValueError(f"base_quantization={self.base_quantization} freezes a 4-bit base for an adapter, and "
                             "method=fft trains every weight: use base_quantization: none, or an adapter method")
        if self.save_epoch_adapters and (self.method == "fft" or self.method in CONVERTED_ON_SAVE):
            raise ValueError(f"save_epoch_adapters is not available for {self.method} (fft has no adapter; OLoRA and "
                             "PiSSA adapters are converted against the initial weights once, at the end): leave it "
                             "off, or use save_steps checkpoints")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    @property
    def shared_ranks(self) -> int:
        """k of RaSA: ranks each layer contributes to the shared pool (`rasa_k`, or the paper's default), as
        `RasaConfig` checks and defaults it (`rasa_lora.adapter.config.check_ranks`, the one source)."""
        from rasa_lora.adapter.config import check_ranks

        return check_ranks(self.r, self.rasa_k)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE_FILE = "config.json"  # the recipe, written into output_dir when a run starts
# A full fine-tune's final save writes the model's own config.json over the recipe (output_dir is then a model
# folder that `from_pretrained` loads); the recipe is kept under this name first (the name `rasa-lora push` uses).
MODEL_DIR_RECIPE_FILE = "rasa_lora_recipe.json"


def read_run_recipe(output_dir: str | Path) -> dict[str, Any] | None:
    """The recipe a run in `output_dir` was started with, or None: `rasa_lora_recipe.json` where a full fine-tune's
    final save kept it, else `config.json` (unless that is a model's config)."""
    import json

    for name in (MODEL_DIR_RECIPE_FILE, RECIPE_FILE):
        path = Path(output_dir) / name
        if path.is_file():
            recipe = json.loads(path.read_text())
            if isinstance(recipe, dict) and "model_type" not in recipe:  # not a model's config
                return recipe
    return None


def default_micro_batch(global_batch_size: int) -> int:
    """The largest divisor of `global_batch_size` not above DEFAULT_MICRO_BATCH."""
    return max(d for d in range(1, min(DEFAULT_MICRO_BATCH, global_batch_size) + 1) if global_batch_size % d == 0)


def valid_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _parse_value(key: str, text: str) -> Any:
    """Parse a command-line value as a YAML scalar; comma-separated text becomes a list for list keys."""
    import yaml

    if key in ("target_modules", "target_parameters", "betas") and "," in text:
        return [yaml.safe_load(part) for part in text.split(",") if part.strip()]
    return yaml.safe_load(text)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `--key value` / `--flag` pairs into a dict; a bare flag means true."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("--"):
            raise ValueError(f"expected --key value, got {token!r}; keys: {', '.join(valid_keys())}")
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if inline:
            overrides[key] = _parse_value(key, inline)
            index += 1
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            overrides[key] = _parse_value(key, args[index + 1])
            index += 2
        else:
            overrides[key] = True
            index += 1
    return overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def _coerce(key: str, annotation: str, value: Any) -> Any:
    """Fix what YAML 1.1 leaves as text (`5e-4` is a string there) and check the value's type."""
    if value is None or not isinstance(value, (str, int, float, list)):
        return value
    kind = annotation.split(" |")[0]
    try:
        if kind == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, str):
            return int(value)
        if kind == "bool" and isinstance(value, str):
            return {"true": True, "false": False}[value.lower()]
        if kind == "list[float]" and isinstance(value, list):
            return [float(item) for item in value]
    except (ValueError, KeyError):
        raise ValueError(f"{key}={value!r} is not a valid {kind}") from None
    if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{key}={value!r} is not a valid {kind}")
    return value


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Make a TrainConfig from a dict, refusing keys the recipe does not have."""
    keys = valid_keys()
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(keys)}")
    annotations = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{key: _coerce(key, annotations[key], value) for key, value in values.items()})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) updated with overrides, checked."""
    values = read_yaml(path) if path is not None else {}
    values.update(overrides or {})
    return build_config(values)
