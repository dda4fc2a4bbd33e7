"""RaSA inside transformers' `Trainer` and TRL's `SFTTrainer`: the paper's prompt as a chat template, its optimizer,
and a callback that guards what RaSA's shared pools need under DeepSpeed ZeRO-3.

    trainer = trl.SFTTrainer(model, args=SFTConfig(..., assistant_only_loss=True), train_dataset=paper_dataset(rows),
                             processing_class=with_paper_template(tokenizer),
                             peft_config=rasa_lora.RasaConfig(r=8, rasa_alpha=32, rasa_dropout=0.05),
                             optimizer_cls_and_kwargs=paper_optimizer(), callbacks=[RasaTrainerCallback()])

- `PAPER_CHAT_TEMPLATE` renders a user turn as the Alpaca prompt of App. B (`train.data.PROMPT`) and an assistant
  turn as the response followed by EOS, inside `{% generation %}` markers, so `assistant_only_loss=True` puts the
  loss on the response only, as `rasa-lora train` does; the rendered text is `rasa-lora train`'s text (tested).
- `paper_optimizer()` is `(DecoupledLionW, kwargs)` for `optimizer_cls_and_kwargs` (the Trainer builds it after
  wrapping the model); its `weight_decay` comes from the Trainer's arguments, which set it per parameter group.
- `RasaTrainerCallback` refuses ZeRO-3 with gradient checkpointing: TRL forces reentrant checkpointing there
  (`SFTTrainer.__init__`, TRL issue 2514), whose per-layer backward passes would reduce a pool's gradient once per
  layer. The fix is named in the error. Under ZeRO-3 without checkpointing it registers each layer's pools as
  external parameters (as `rasa-lora train` does; see `train/distributed.py`). Not run under DeepSpeed here.
Limits: the template has no system turn and no Alpaca `input` section (`paper_dataset` refuses such records).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from rasa_lora.train.data import PROMPT
from rasa_lora.train.optim import DecoupledLionW

_BEFORE, _AFTER = PROMPT.split("{instruction}")
PAPER_CHAT_TEMPLATE = (
    "{%- set prompt_start = " + json.dumps(_BEFORE) + " -%}"
    "{%- set prompt_end = " + json.dumps(_AFTER) + " -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- prompt_start + message['content'] + prompt_end -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('the paper prompt has user and assistant turns only, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def with_paper_template(tokenizer: Any) -> Any:
    """`tokenizer` with `PAPER_CHAT_TEMPLATE` as its chat template (returned for chaining)."""
    tokenizer.chat_template = PAPER_CHAT_TEMPLATE
    return tokenizer


def paper_messages(instruction: str, response: str) -> dict[str, list[dict[str, str]]]:
    """One example in TRL's conversational format."""
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]}


def paper_dataset(records: Iterable[dict[str, Any]], dataset_format: str = "auto") -> Any:
    """A `datasets.Dataset` of conversations from records `rasa-lora train` reads (GSM8K, MATH, MetaMathQA,
    Magicoder, Alpaca without `input`), with the same answer rewriting (`train.data.to_example`)."""
    from datasets import Dataset

    from rasa_lora.train.data import FIELDS, detect_format, to_example

    rows = []
    for index, record in enumerate(records):
        where = f"record {index}"
        kind = detect_format(record, where) if dataset_format == "auto" else dataset_format
        if kind == "completion" or record.get("input"):
            raise ValueError(f"{where}: the paper's chat template has no input section and no free prompt; train "
                             "such records with `rasa-lora train`, or give TRL a prompt-completion dataset")
        example = to_example(record, kind, where)
        rows.append(paper_messages(record[FIELDS[kind][0]], example.response))
    return Dataset.from_list(rows)


def paper_optimizer(lr: float = 5e-4, betas: tuple[float, float] = (0.9, 0.95)) -> tuple[type, dict[str, Any]]:
    """`optimizer_cls_and_kwargs` for the paper's decoupled LionW (set `weight_decay` in the Trainer's arguments)."""
    return DecoupledLionW, {"lr": lr, "betas": tuple(betas)}


def zero3_enabled(args: Any) -> bool:
    """Whether the Trainer's arguments ask for DeepSpeed ZeRO stage 3."""
    plugin = getattr(args, "deepspeed_plugin", None)
    return plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) == 3


def check_trainer_args(args: Any) -> None:
    """Refuse, naming the fix, what RaSA's shared pools cannot train under."""
    if zero3_enabled(args) and getattr(args, "gradient_checkpointing", False):
        raise ValueError(
            "RaSA with DeepSpeed ZeRO-3 and gradient checkpointing: TRL forces reentrant checkpointing under ZeRO-3, "
            "whose per-layer backward passes would reduce each shared pool's gradient once per layer. Use ZeRO-2 "
            "(the paper's setup; configs/distributed/zero2.yaml), or gradient_checkpointing=False, or "
            "`rasa-lora train` with configs/distributed/zero3.yaml (non-reentrant checkpointing, pools registered)."
        )


class RasaTrainerCallback(TrainerCallback):
    """Checks the Trainer's arguments when it is built (`check_trainer_args`) and, under ZeRO-3, registers each RaSA
    layer's pools with DeepSpeed before the model is wrapped."""

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        check_trainer_args(args)
        if zero3_enabled(args) and model is not None:
            from rasa_lora.train.distributed import register_zero3_external_parameters

            register_zero3_external_parameters(model)
        return control
