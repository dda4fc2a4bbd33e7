"""The training loop of the SFT recipe, in plain functions so `accelerate` can wrap the pieces later.

`train(config)` runs: check the output directory -> load tokenizer and data -> build model, optimizer, scheduler
(each in its own function: `build_model`, `build_optimizer`, `build_scheduler`, the slots `accelerator.prepare`
would take) -> loop -> write the adapter (PEFT format), `metrics.jsonl`, `summary.json`, `loss.png`.

Choices:
- One optimizer step = `global_batch_size` examples in micro-batches of `micro_batch_size`. The loss of each
  micro-batch is its summed token loss divided by the number of response tokens in the whole step
  (`num_items_in_batch`), so accumulation gives exactly the gradient of the step's mean token loss.
- bf16 autocast on CUDA devices that support it (`bf16: auto`); the CPU runs float32 (bit-reproducible).
- Nothing is written before the tokenizer, data and model have loaded, so bad input leaves no directory behind;
  a run that fails before its first checkpoint removes the directory it created.
- SIGINT/SIGTERM set a flag (and say so at once); the loop finishes the current step, writes a checkpoint and exits
  with 130/143; a second Ctrl-C stops at once, without a checkpoint. `resume: true` restores the newest checkpoint;
  on the CPU with a fixed seed the result is bitwise identical to an uninterrupted run (tested).
- The progress bar moves once per micro-batch (a paper-recipe step on a CPU is minutes long); on a CPU, a run of
  more than CPU_WARN_EXAMPLES examples' passes is announced with the quick recipe before the model loads.
- Many processes: `accelerate launch --config_file configs/distributed/<ddp|fsdp2|zero2|zero3>.yaml -m rasa_lora.cli
  train ...`; each process takes its share of a step's micro-batches, and `train/distributed.py` does what each
  engine needs (docs/distributed.md). The main process writes the directory, metrics and adapter; every process
  writes its part of a checkpoint (its RNG; under DeepSpeed its partitions).
- Checkpoints and resume under every engine but FSDP1 (`checkpoint.py`: one layout for one process, DDP and FSDP2,
  DeepSpeed's own for ZeRO); the checkpoint is restored after `accelerator.prepare`, once the engine has sharded.
Limits: AdaLoRA's regulariser is added per micro-batch, so its reported loss includes it once per micro-batch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rasa_lora.atomic import write_atomic
from rasa_lora.train import checkpoint, data, distributed, methods, optim, tracking
from rasa_lora.train.config import MODEL_DIR_RECIPE_FILE, OPERATIONAL_KEYS, RECIPE_FILE, TrainConfig, read_run_recipe

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(Exception):
    """Raised after a signal's checkpoint has been written; carries the exit code."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step}; checkpoint {path}")
        self.exit_code = SIGNAL_EXIT_CODES.get(signum, 1)


@dataclass
class LoopState:
    """Counters a checkpoint must restore (besides model, optimizer, scheduler and RNG)."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    best_loss: float = math.inf
    last_loss: float = math.nan
    eval_loss: float = math.nan
    best_eval_loss: float = math.inf


@dataclass
class Run:
    config: TrainConfig
    tokenizer: Any
    examples: list[dict[str, list[int]]]
    total_steps: int
    steps_per_epoch: int
    eval_examples: list[dict[str, list[int]]] = field(default_factory=list)
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Any = None  # accelerate.Accelerator (one process or many; see train/distributed.py)
    state: LoopState = field(default_factory=LoopState)
    epoch_plan: tuple[int, list[list[list[int]]]] = (-1, [])
    resume_from: Path | None = None  # the checkpoint `restore` loads after the engine's preparation


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return config.bf16 == "true"


def check_output_dir(config: TrainConfig) -> None:
    """Refuse to clobber a run; refuse to resume what has no checkpoint. Writes nothing."""
    out = Path(config.output_dir)
    if config.resume:
        if not checkpoint.checkpoint_dirs(out):
            raise FileNotFoundError(f"--resume: {out} holds no checkpoint; start the run without --resume")
        return
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {str(out)!r} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(
            f"output_dir {str(out)!r} already exists and is not empty; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output-dir"
        )


def check_resume_config(config: TrainConfig) -> None:
    """A resumed run must compute the same thing: every non-operational key must match the saved config. A key the
    saved config lacks (a run begun before the key existed) matches its default, which is what that run used."""
    saved = read_run_recipe(config.output_dir)
    if saved is None:
        raise FileNotFoundError(f"--resume: {config.output_dir} holds no recipe (config.json); start the run afresh")
    current = config.to_dict()
    defaults = TrainConfig().to_dict()
    saved = {key: saved.get(key, defaults[key]) for key in current}
    changed = [key for key in current if key not in OPERATIONAL_KEYS and saved[key] != current[key]]
    if changed:
        details = ", ".join(f"{key}: saved {saved.get(key)!r}, now {current[key]!r}" for key in changed)
        raise ValueError(f"--resume with a different recipe ({details}); rerun with the original keys")


def load_tokenizer(config: TrainConfig) -> Any:
    from rasa_lora.models import load_tokenizer as load

    tokenizer = load(config.tokenizer or config.base_model)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {config.tokenizer or config.base_model!r} has no EOS token; set one")
    return tokenizer


def plan_steps(config: TrainConfig, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps)."""
    steps_per_epoch = math.ceil(num_examples / config.global_batch_size)
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    return steps_per_epoch, max(1, total)


def prepare_run(config: TrainConfig) -> Run:
    """Tokenizer and tokenized data: everything that can fail on bad input before a model is loaded."""
    tokenizer = load_tokenizer(config)
    train_examples, held_out = data.load_splits(config)
    examples = data.tokenize_all(train_examples, tokenizer, config.cutoff_len)
    eval_examples = data.tokenize_all(held_out, tokenizer, config.cutoff_len) if held_out else []
    steps_per_epoch, total_steps = plan_steps(config, len(examples))
    return Run(config=config, tokenizer=tokenizer, examples=examples, total_steps=total_steps,
               steps_per_epoch=steps_per_epoch, eval_examples=eval_examples)


def build_model(config: TrainConfig, total_steps: int, device: torch.device,
                use_reentrant: bool | None = None) -> torch.nn.Module:
    """Base model + the method's adapter (or all weights trainable), moved to `device`."""
    from rasa_lora.models import load_model

    dtype = config.model_dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    quantized = getattr(config, "base_quantization", "none") == "nf4"
    if quantized:
        model = load_quantized(config.base_model, dtype, device)
    else:
        model = load_model(config.base_model, dtype=dtype)
    model = methods.apply_method(model, config, total_steps)
    if config.gradient_checkpointing:
        methods.enable_gradient_checkpointing(model, config.use_reentrant if use_reentrant is None else use_reentrant)
    return (model if quantized else model.to(device)).train()


def load_quantized(base_model: str | None, dtype: str, device: torch.device) -> torch.nn.Module:
    """The base with NF4 linear layers (lm_head kept): loaded 4-bit by transformers on a GPU (the full-precision
    model never sits in memory), quantized after loading on a CPU (`rasa_lora.quant.quantize_model`)."""
    from rasa_lora import quant
    from rasa_lora.errors import UserError
    from rasa_lora.models import load_model

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("base_quantization: nf4 needs bitsandbytes: pip install rasa-lora[quant]") from None
    torch_dtype = getattr(torch, dtype)
    if device.type != "cuda":
        return quant.quantize_model(load_model(base_model, dtype=dtype))
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype,
                                bnb_4bit_use_double_quant=False)
    return load_model(base_model, dtype=dtype, quantization_config=config, device_map={"": device})


SKIP_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def compile_model(run: Run) -> None:
    """`compile: true`: torch.compile the model in place (`nn.Module.compile`: saving and unwrapping see the same
    module). The device's dropout seed state exists by then (`train` reseeds it), so tracing finds it."""
    from rasa_lora import settings

    config = run.config
    for switch in (settings.FUSED, settings.DEVICE_SEED, settings.KEEP_U, settings.KERNELS):
        switch()  # read the environment now: a first read while tracing would be guarded on and traced again
    if run.device.type == "cuda":  # updated in place only: CUDA graphs may keep its address (not yet measured)
        from rasa_lora.ops import dropout

        torch._dynamo.mark_static_address(dropout.device_state(run.device))
    if config.gradient_checkpointing and hasattr(torch._dynamo.config, SKIP_SIDE_EFFECTS):
        # else a side effect in a checkpointed forward (the hub-kernels layer transformers wraps modules in sets a
        # context variable) makes dynamo run every checkpointed decoder layer eagerly (docs/performance.md)
        setattr(torch._dynamo.config, SKIP_SIDE_EFFECTS, True)
    kwargs = {"backend": config.compile_backend}
    if config.compile_backend == "inductor" and config.compile_mode != "default":
        kwargs["mode"] = config.compile_mode
    if cuda_graphs(config):
        # gradients that stay put: a .grad first made inside a captured backward is the graph's output memory, which
        # the next micro-batch's replay overwrites (gradient accumulation); zeroed in place, never set to None
        for param in run.model.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
        if config.gradient_checkpointing and run.accelerator.is_main_process:
            print(CHECKPOINTED_GRAPHS_WARNING, file=sys.stderr, flush=True)
    if run.accelerator.is_main_process:  # else the first step stalls for minutes with no word (benchmarks/RESULTS.md)
        print(f"rasa-lora train: compiling the model ({config.compile_backend}, {config.compile_mode}) at its first "
              "micro-batch of each new shape: the first steps take minutes", file=sys.stderr, flush=True)
    run.model.compile(**kwargs)


# A GPU test of checkpointed CUDA-graph steps failed on a PyTorch buffer reuse, worked around, not re-run on the GPU
CHECKPOINTED_GRAPHS_WARNING = ("rasa-lora train: warning: compile_mode reduce-overhead with gradient checkpointing is "
                               "not yet verified on the GPU (its test failed on a PyTorch buffer reuse worked around "
                               "since, not yet re-run: docs/performance.md, \"CPU buffer\"); "
                               "gradient_checkpointing: false is the tested form")


def cuda_graphs(config: Any) -> bool:
    """Whether the model runs as inductor's CUDA graphs (`compile_mode: reduce-overhead`)."""
    return bool(getattr(config, "compile", False)) and getattr(config, "compile_mode", "default") == "reduce-overhead"


def check_cuda_graphs(config: TrainConfig, device: torch.device) -> None:
    """CUDA graphs need a CUDA device (inductor would run without them, silently, elsewhere)."""
    if cuda_graphs(config) and device.type != "cuda":
        from rasa_lora.errors import UserError

        raise UserError(f"compile_mode: reduce-overhead records CUDA graphs and needs a CUDA device, not "
                        f"{device.type}; use compile_mode: default")


def cuda_graph_step() -> None:
    """Before a compiled forward under CUDA graphs: a new iteration begins, so the graphs may reuse the memory of the
    previous one's outputs (the loss was read and the backward ran by then)."""
    torch.compiler.cudagraph_mark_step_begin()


# PyTorch's CUDA graph trees with non-reentrant checkpointing (pytorch/pytorch#154306, open; reported to fail with
# torch 2.11 too): a recomputation keeps alive an input the recording saw freed
CHECKPOINT_GRAPH_BUG = "graph recording observed an input tensor deallocate during graph recording"


def cuda_graph_error(error: BaseException) -> Exception | None:
    """The one-line error naming the fix for a known failure of CUDA graphs (None for any other error)."""
    if CHECKPOINT_GRAPH_BUG not in str(error):
        return None
    from rasa_lora.errors import UserError

    return UserError("compile_mode: reduce-overhead failed in PyTorch's CUDA graph trees with gradient checkpointing "
                     "(pytorch/pytorch#154306): set gradient_checkpointing: false, or compile_mode: default")


_CUDAGRAPH_SKIPS_REPORTED: list[bool] = []


def report_cudagraph_skips() -> None:
    """After the first optimizer step under CUDA graphs: one line on stderr if inductor ran graphs without them (it
    does so silently: a CPU tensor in the graph, an input mutated that is not static...)."""
    if _CUDAGRAPH_SKIPS_REPORTED:
        return
    _CUDAGRAPH_SKIPS_REPORTED.append(True)
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    if skips:
        print(f"rasa-lora train: warning: compile_mode reduce-overhead: inductor skipped CUDA graphs for {skips} "
              "graph(s); TORCH_LOGS=cudagraphs names why", file=sys.stderr, flush=True)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return optim.build_optimizer(model.parameters(), config)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig) -> Any:
    return optim.build_scheduler(optimizer, total_steps, config)


def step_micro_batches(run: Run, step: int) -> list[dict[str, torch.Tensor]]:
    """The collated micro-batches of optimizer step `step` (a pure function of seed, epoch and step)."""
    epoch, index = divmod(step, run.steps_per_epoch)
    if run.epoch_plan[0] != epoch:
        lengths = [len(item["input_ids"]) for item in run.examples]
        run.epoch_plan = (epoch, data.step_batches(lengths, run.config.global_batch_size, run.config.micro_batch_size,
                                                   run.config.seed, epoch, run.config.group_by_length))
    plan = run.epoch_plan[1]
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    multiple = run.config.pad_to_multiple_of
    return [data.collate([run.examples[i] for i in micro], pad, multiple) for micro in plan[index]]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated micro-batch on `device`. On CUDA the tensors are copied from pinned memory without waiting: a
    plain `.to("cuda")` synchronizes with the stream, so the host would wait for the previous micro-batch's
    backward before queueing the next forward (which also undid reading the loss once a step); docs/performance.md,
    record 12."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def train_step(run: Run, step: int, autocast: bool, on_micro_batch: Any = None) -> tuple[float, int]:
    """Forward/backward over the step's micro-batches, one optimizer step; returns (mean token loss, tokens).
    `on_micro_batch()`, when given, is called after each micro-batch's backward (the progress bar)."""
    micro_batches = step_micro_batches(run, step)
    num_items = sum(int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for batch in micro_batches)
    accelerator = run.accelerator
    divisor = distributed.loss_divisor(num_items, accelerator)  # = num_items in one process
    if getattr(run.config, "compile", False):  # a tensor: a number would be a constant of the graph, recompiled
        divisor = torch.tensor(float(divisor), dtype=torch.float32, device=run.device)
    local = distributed.local_micro_batches(micro_batches, accelerator)
    # The loss is summed on the device and read once a step: a `.item()` per micro-batch would make the host wait
    # for each micro-batch's backward before queueing the next forward. float64, added in the same order, gives the
    # same sum as Python floats did. Tokens are counted from the collated CPU tensors.
    total_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    tokens = 0
    graphs = cuda_graphs(run.config)
    for index, batch in enumerate(local):
        tokens += int(batch["attention_mask"].sum())
        batch = to_device(batch, run.device)
        if graphs:
            cuda_graph_step()
        context = torch.autocast(run.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        try:
            with distributed.micro_batch_sync(accelerator, run.model, last=index == len(local) - 1):
                with context:
                    loss = run.model(**batch, num_items_in_batch=divisor).loss
                accelerator.backward(loss)
        except RuntimeError as error:
            known = cuda_graph_error(error) if graphs else None
            if known is not None:
                raise known from error
            raise
        total_loss += loss.detach().double()
        if on_micro_batch is not None:
            on_micro_batch()
    if run.config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    methods.after_optimizer_step(accelerator.unwrap_model(run.model), run.config, step + 1)
    run.optimizer.zero_grad(set_to_none=not graphs)  # CUDA graphs: the .grad buffers stay (`compile_model`)
    if graphs:
        report_cudagraph_skips()
    totals = accelerator.reduce(torch.stack([total_loss, total_loss.new_tensor(tokens)]), "sum")
    return float(totals[0]) / accelerator.num_processes, int(totals[1])


def held_out_loss(run: Run, autocast: bool) -> tuple[float, int]:
    """(mean token loss, response tokens) over the held-out examples, dropout off, no gradient.

    Batches of `eval_batch_size` examples in length order (the same batches at every evaluation). Every process
    computes the whole set: sharded engines (FSDP, ZeRO-3) need every process in every forward."""
    config = run.config
    order = sorted(range(len(run.eval_examples)), key=lambda i: len(run.eval_examples[i]["input_ids"]))
    size = config.eval_batch_size or config.micro_batch_size
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    tokens = 0
    run.model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), size):
                batch = data.collate([run.eval_examples[i] for i in order[start:start + size]], pad,
                                     run.config.pad_to_multiple_of)
                tokens += int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
                batch = to_device(batch, run.device)
                if cuda_graphs(config):
                    cuda_graph_step()
                context = (torch.autocast(run.device.type, dtype=torch.bfloat16) if autocast
                           else contextlib.nullcontext())
                with context:  # num_items_in_batch=1: the loss is the batch's summed token loss
                    total += run.model(**batch, num_items_in_batch=1).loss.double()
    finally:
        run.model.train()
    return float(total) / max(tokens, 1), tokens


def evaluation_due(run: Run, step: int) -> bool:
    """Whether the held-out loss is computed after optimizer step `step` (0: before training)."""
    if not run.eval_examples:
        return False
    if step == 0 or step == run.total_steps:
        return True
    every = run.config.eval_steps
    return step % every == 0 if every else step % run.steps_per_epoch == 0


def log_evaluation(run: Run, metrics: Any, autocast: bool) -> None:
    """Compute the held-out loss now and write its metrics row (rows with `eval_loss` and no `loss`)."""
    loss, tokens = held_out_loss(run, autocast)
    state = run.state
    state.eval_loss, state.best_eval_loss = loss, min(state.best_eval_loss, loss)
    if run.accelerator.is_main_process:
        row = {"step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4), "eval_loss": loss,
               "eval_tokens": tokens, "eval_examples": len(run.eval_examples)}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        tracking.log(run.accelerator, run.config, row)


class _StopFlag:
    """Records SIGINT/SIGTERM instead of dying mid-step, and says so at once (`announce`); a second SIGINT raises
    KeyboardInterrupt (stop now, no checkpoint). Restores the previous handlers on exit."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for signum in SIGNAL_EXIT_CODES:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\nrasa-lora train: {signal.Signals(signum).name} received: finishing this step, then writing a "
                  "checkpoint (Ctrl-C again stops at once, without one)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _log_row(run: Run, step: int, loss: float, tokens_per_s: float) -> dict[str, Any]:
    return {"step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": loss,
            "lr": run.scheduler.get_last_lr()[0], "tokens": run.state.tokens, "tokens_per_s": round(tokens_per_s, 1),
            "elapsed_s": round(run.state.elapsed_s, 3)}


def _save(run: Run) -> Path:
    """Checkpoint the run on every process (`checkpoint.save_training_state`: the engine's layout, atomic)."""
    from dataclasses import asdict

    return checkpoint.save_training_state(run.config.output_dir, run.state.step, run.model, run.optimizer,
                                          run.scheduler, asdict(run.state), run.config.save_total_limit,
                                          run.accelerator)


EPOCHS = "epochs"


def epoch_adapter_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of the adapters kept after each whole epoch (`save_epoch_adapters`), oldest first."""
    root = Path(output_dir) / EPOCHS
    found = [(int(path.name[6:]), path) for path in root.glob("epoch-*")
             if path.name[6:].isdigit() and (path / "adapter_config.json").is_file()]
    return sorted(found)


def save_epoch_adapter(run: Run, epoch: int) -> None:
    """The adapter as it is after `epoch` whole epochs, into output_dir/epochs/epoch-N (written to a temporary
    folder first, so an interruption never leaves a partial one where `epoch_adapter_dirs` looks)."""
    final = Path(run.config.output_dir) / EPOCHS / f"epoch-{epoch}"
    partial = final.with_name(final.name + ".partial")
    if run.accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    distributed.save_adapter(run.model, run.accelerator, partial)
    if run.accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    run.accelerator.wait_for_everyone()


def training_loop(run: Run, metrics_path: Path) -> None:
    """Steps from `run.state.step` to `run.total_steps`, logging, checkpointing and honouring signals."""
    from tqdm.auto import tqdm

    config, autocast = run.config, use_bf16(run.config, run.device)
    per_step = math.ceil(config.gradient_accumulation_steps / run.accelerator.num_processes)
    main = run.accelerator.is_main_process
    bar = tqdm(total=run.total_steps * per_step, initial=run.state.step * per_step, unit="micro-batch",
               desc=f"train {config.method} step {run.state.step + 1}/{run.total_steps}",
               disable=not (config.progress_bar and main), dynamic_ncols=True)
    with _StopFlag(announce=main) as stop, bar, metrics_path.open("a") as metrics:
        if run.state.step == 0 and evaluation_due(run, 0):
            log_evaluation(run, metrics, autocast)
        while run.state.step < run.total_steps:
            started = time.perf_counter()
            bar.set_description(f"train {config.method} step {run.state.step + 1}/{run.total_steps}", refresh=False)
            loss, tokens = train_step(run, run.state.step, autocast, on_micro_batch=lambda: bar.update(1))
            seconds = time.perf_counter() - started
            state = run.state
            state.step, state.tokens, state.elapsed_s = state.step + 1, state.tokens + tokens, state.elapsed_s + seconds
            state.last_loss, state.best_loss = loss, min(state.best_loss, loss)
            row = _log_row(run, state.step, loss, tokens / max(seconds, 1e-9))
            if run.accelerator.is_main_process and (state.step % config.logging_steps == 0
                                                    or state.step == run.total_steps):
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                tracking.log(run.accelerator, config, row)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if evaluation_due(run, state.step):
                log_evaluation(run, metrics, autocast)
            if config.save_steps and state.step % config.save_steps == 0 and state.step < run.total_steps:
                _save(run)
            if config.save_epoch_adapters and state.step % run.steps_per_epoch == 0:
                save_epoch_adapter(run, state.step // run.steps_per_epoch)
            signum = distributed.agreed_signal(stop.signum, run.accelerator)  # all processes stop together
            if signum is not None:
                raise TrainingInterrupted(signum, state.step, _save(run))


@contextlib.contextmanager
def collector_spares_setup():
    """Python's cyclic collector skips everything alive when training starts (model, optimizer, data, the
    libraries), which would otherwise stay in its oldest generation and be walked by every full collection (the
    setup's objects number in the hundreds of thousands with torch and transformers loaded; docs/performance.md,
    record 13). What training creates is collected as before; the setup objects return to the collector when the
    loop ends."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after the checkpoint being resumed (they will be recomputed)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(line + "\n" for line in rows if json.loads(line)["step"] <= last_step))


def plot_loss(metrics_path: Path, image_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_rows = [row for row in rows if "loss" in row]
    eval_rows = [row for row in rows if "eval_loss" in row]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([row["step"] for row in train_rows], [row["loss"] for row in train_rows],
              marker="." if len(train_rows) < 50 else None, label="training")
    if eval_rows:
        axis.plot([row["step"] for row in eval_rows], [row["eval_loss"] for row in eval_rows], marker="o",
                  label=f"held-out ({eval_rows[-1]['eval_examples']} examples)")
        axis.legend()
    axis.set(xlabel="optimizer step", ylabel="loss (response tokens)", title=title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(image_path, dpi=100)
    plt.close(figure)


def keep_recipe(out: Path, main: bool) -> None:
    """Before a full fine-tune's `save_pretrained` writes the model's config.json over the recipe, copy the recipe to
    `MODEL_DIR_RECIPE_FILE` (atomically; once: a resumed run keeps the copy it has)."""
    target, recipe = out / MODEL_DIR_RECIPE_FILE, out / RECIPE_FILE
    if not main or target.is_file() or not recipe.is_file():
        return
    write_atomic(target, recipe.read_text())


def save_final(run: Run) -> None:
    """The adapter in PEFT format (the full model for fft) and the tokenizer, into output_dir."""
    out = Path(run.config.output_dir)
    initial = out / "initial_adapter"
    accelerator = run.accelerator
    if run.config.method == "fft":
        keep_recipe(out, accelerator.is_main_process)
        state = accelerator.get_state_dict(run.model)
        accelerator.unwrap_model(run.model).save_pretrained(out, state_dict=state,
                                                           is_main_process=accelerator.is_main_process)
    elif methods.initial_adapter_needed(run.config.method):
        # Converts the OLoRA/PiSSA adapter into a LoRA one that applies to the original base weights.
        distributed.save_adapter(run.model, accelerator, out, path_initial_model_for_weight_conversion=str(initial))
    else:
        distributed.save_adapter(run.model, accelerator, out)
    if accelerator.is_main_process:
        run.tokenizer.save_pretrained(out)


def check_saveable(model: torch.nn.Module, config: TrainConfig) -> None:
    """fft saves the whole model at the end: refuse, before training, a model transformers would not save."""
    from rasa_lora.errors import UserError
    from rasa_lora.models import unsaveable_reason

    reason = unsaveable_reason(model) if config.method == "fft" else None
    if reason:
        raise UserError(f"--method fft: the trained model could not be saved: {reason}; give a float base model (a "
                        f"checkpoint folder, a .gguf file or \"smollm2\"), or train an adapter (e.g. --method lora)")


def save_final_or_checkpoint(run: Run) -> None:
    """`save_final`; if it fails after the last step, checkpoint that step first, so that `--resume` goes straight
    to the final save instead of training again from the previous checkpoint."""
    try:
        save_final(run)
    except Exception:
        done = run.state.step >= run.total_steps
        saved = [checkpoint.step_of(path) for path in checkpoint.checkpoint_dirs(run.config.output_dir)]
        if done and run.state.step not in saved:
            path = _save(run)
            if run.accelerator.is_main_process:
                print(f"rasa-lora train: the final save failed; the trained state is checkpointed in {path}: fix "
                      "the cause below and rerun the same command with --resume to save it without training again",
                      file=sys.stderr, flush=True)
        raise


def write_summary(run: Run, trainable: int, total: int, wall_s: float) -> dict[str, Any]:
    config, state = run.config, run.state
    summary = {
        "method": config.method, "base_model": config.base_model or "smollm2",
        "dataset": config.dataset or "arithmetic",
        "r": config.r, "rasa_k": config.shared_ranks if config.method == "rasa" else None,
        "trainable_params": trainable, "total_params": total, "examples": len(run.examples),
        "steps": state.step, "total_steps": run.total_steps, "tokens": state.tokens,
        "train_time_s": round(state.elapsed_s, 3), "wall_time_s": round(wall_s, 3),
        "final_loss": state.last_loss, "best_loss": state.best_loss, "device": str(run.device),
    }
    if run.eval_examples:
        summary.update(eval_examples=len(run.eval_examples), final_eval_loss=state.eval_loss,
                       best_eval_loss=state.best_eval_loss)
    Path(config.output_dir, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def restore(run: Run) -> None:
    """Load `run.resume_from` into the prepared model and optimizer (every engine shards them by then)."""
    run.state = LoopState(**checkpoint.load_training_state(run.resume_from, run.model, run.optimizer, run.scheduler,
                                                           run.accelerator))
    if run.accelerator.is_main_process:
        _truncate_metrics(Path(run.config.output_dir) / "metrics.jsonl", run.state.step)
    run.accelerator.wait_for_everyone()


def start_or_resume(run: Run) -> None:
    """Create the output directory (fresh run) or restore the newest checkpoint (resume)."""
    out = Path(run.config.output_dir)
    if methods.initial_adapter_needed(run.config.method):
        run.model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the later conversion
    if run.config.resume:
        check_resume_config(run.config)
        run.resume_from = checkpoint.checkpoint_dirs(out)[-1]  # restored by `restore` once the engine is ready
        return
    if run.accelerator.is_main_process:
        if run.config.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(json.dumps(run.config.to_dict(), indent=2) + "\n")
        if methods.initial_adapter_needed(run.config.method):
            run.model.save_pretrained(out / "initial_adapter")
    run.accelerator.wait_for_everyone()


# On a CPU, runs that pass more examples than this through the model are announced with the quick recipe.
CPU_WARN_EXAMPLES = 500  # the quick trial passes 160
QUICK_RECIPE = ("rasa-lora train --global-batch-size 8 --micro-batch-size 8 --max-steps 20 --num-examples 160 "
                "--gradient-checkpointing false --output-dir runs/try")


def cpu_warning(config: TrainConfig, total_steps: int, device: torch.device) -> str | None:
    """The warning for a long run on a CPU (None otherwise): its size, and the quick recipe (what `rasa-lora demo`
    trains; times on a 2-core CPU in docs/first-hour.md)."""
    passes = total_steps * config.global_batch_size
    if device.type != "cpu" or passes <= CPU_WARN_EXAMPLES:
        return None
    return (f"rasa-lora train: warning: on a CPU this run is {total_steps:,} optimizer steps of "
            f"{config.global_batch_size} examples ({passes:,} forward/backward passes of up to {config.cutoff_len} "
            f"tokens), slow on a CPU (measured times: docs/first-hour.md). A quick trial: {QUICK_RECIPE}")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the recipe end to end; returns the summary. Raises TrainingInterrupted after a signal's checkpoint."""
    wall_start = time.perf_counter()
    tracking.check_available(config.report_to)
    accelerator = distributed.make_accelerator(**tracking.accelerator_kwargs(config))
    check_output_dir(config)
    accelerator.wait_for_everyone()  # every process checked before the main one creates the directory
    engine = distributed.detect_engine(accelerator)
    use_reentrant = distributed.checkpointing_kwargs(engine, config.use_reentrant)["use_reentrant"]
    distributed.check_supported(engine, config)
    if config.resume:  # a checkpoint this engine or number of processes cannot resume: refused before loading
        checkpoint.check_resumable(checkpoint.checkpoint_dirs(config.output_dir)[-1], engine.value,
                                   accelerator.num_processes)
    run = prepare_run(config)
    run.accelerator, run.device = accelerator, accelerator.device
    check_cuda_graphs(config, run.device)
    warning = cpu_warning(config, run.total_steps, run.device)
    if warning and accelerator.is_main_process:
        print(warning, file=sys.stderr, flush=True)
    run.model = build_model(config, run.total_steps, run.device, use_reentrant)
    check_saveable(run.model, config)
    run.optimizer = build_optimizer(run.model, config)
    run.scheduler = build_scheduler(run.optimizer, run.total_steps, config)
    out, created = Path(config.output_dir), not Path(config.output_dir).exists() or config.overwrite
    if config.compile:  # the device dropout seed (compiled layers draw their masks from it) starts afresh
        from rasa_lora.ops import dropout

        dropout.reseed(run.device)
    start_or_resume(run)
    run.model, run.optimizer, run.scheduler = distributed.prepare_training(
        accelerator, run.model, run.optimizer, run.scheduler, use_reentrant, config.micro_batch_size)
    if run.resume_from is not None:
        restore(run)
    if config.compile:
        compile_model(run)
    tracking.start(accelerator, config)
    try:
        with collector_spares_setup():
            training_loop(run, out / "metrics.jsonl")
    except TrainingInterrupted:
        raise
    except BaseException:
        if created and not checkpoint.checkpoint_dirs(out):
            shutil.rmtree(out, ignore_errors=True)  # nothing resumable: leave no partial run behind
        raise
    finally:
        tracking.finish(accelerator, config)
    save_final_or_checkpoint(run)
    trainable, total = methods.count_parameters(run.model)
    if not accelerator.is_main_process:
        return {}
    title = f"{config.method} r={config.r} on {config.dataset or 'arithmetic'}"
    plot_loss(out / "metrics.jsonl", out / "loss.png", title)
    return write_summary(run, trainable, total, time.perf_counter() - wall_start)
