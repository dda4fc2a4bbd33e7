"""Training data: readers for the paper's datasets, the Alpaca prompt, response-only labels, length-grouped batches.

Formats (picked from the fields of the first record when `dataset_format: auto`):
- GSM8K `question`/`answer`: calculator annotations `<<48/2=24>>` removed, the final `#### X` line rewritten to
  `The answer is: X` (App. C: every math target ends that way, so evaluation can extract it).
- MATH `problem`/`solution`: the last `\\boxed{...}` is appended as `The answer is: X`.
- MetaMathQA `query`/`response`, Magicoder-Evol-Instruct `instruction`/`response`: taken as they are.
- generic JSONL: `instruction`/`input`/`output` (Alpaca) or `prompt`/`completion` (the prompt is used verbatim).
- `arithmetic`: a seeded generator of short word problems with step-by-step answers ending `The answer is: X`;
  the default when no dataset is given, so that training works offline.

Each example is the Alpaca prompt of App. B followed by the response and the tokenizer's EOS; prompt tokens are
labelled -100 so the loss covers the response only. Local `.jsonl`/`.json` files are parsed here so that a bad
line is reported with its file and line number; other files and hub names go through `datasets` (imported lazily).

Batching: each optimizer step takes `global_batch_size` examples from a seeded per-epoch permutation; with
`group_by_length` those examples are sorted by length before being cut into micro-batches, so padding shrinks
while the content of every step stays a uniform random sample. The order depends only on (seed, epoch), which
is what makes `--resume` exact: the position in the data is the step number.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
IGNORE_INDEX = -100
# format -> (prompt field, response field); "alpaca" also reads an optional `input`.
FIELDS = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "metamathqa": ("query", "response"),
    "magicoder": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
}


@dataclass
class Example:
    prompt: str
    response: str


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt of the paper's App. B (the variant with an input section when one is given)."""
    if input_text:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT.format(instruction=instruction)


def rewrite_gsm8k_answer(answer: str) -> str:
    """Drop `<<calc>>` annotations and turn the final `#### X` into `The answer is: X`."""
    text = re.sub(r"<<[^<>]*>>", "", answer)
    match = re.search(r"\n?####\s*(.+?)\s*$", text)
    if match is None:
        raise ValueError(f"GSM8K answer has no final '#### X' line: {answer[-80:]!r}")
    final = match.group(1).replace(",", "")
    return f"{text[: match.start()].rstrip()}\nThe answer is: {final}"


def last_boxed(solution: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; `\\boxed 5` is read too."""
    boxed, fbox = solution.rfind("\\boxed"), solution.rfind("\\fbox")
    if boxed < 0 and fbox < 0:
        return None
    rest = solution[boxed + len("\\boxed"):] if boxed > fbox else solution[fbox + len("\\fbox"):]
    if rest.startswith(" "):
        return rest[1:].split("$")[0].strip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:index]
    return None


def rewrite_math_solution(solution: str) -> str:
    answer = last_boxed(solution)
    if answer is None:
        raise ValueError(f"MATH solution has no \\boxed{{}} answer: {solution[-80:]!r}")
    return f"{solution.rstrip()}\nThe answer is: {answer}"


def detect_format(record: dict[str, Any], where: str) -> str:
    for name in ("gsm8k", "math", "metamathqa", "magicoder", "alpaca", "completion"):
        if all(key in record for key in FIELDS[name]):
            return name
    expected = "; ".join(f"{name}: {'/'.join(keys)}" for name, keys in FIELDS.items())
    raise ValueError(f"{where}: cannot tell the dataset format from fields {sorted(record)}; "
                     f"expected one of {expected}")


def to_example(record: dict[str, Any], dataset_format: str, where: str) -> Example:
    """One record -> prompt + response, after the per-format rewriting."""
    prompt_key, response_key = FIELDS[dataset_format]
    missing = [key for key in (prompt_key, response_key) if not isinstance(record.get(key), str)]
    if missing:
        raise ValueError(
            f"{where}: field(s) {', '.join(missing)} missing or not text; format {dataset_format!r} needs "
            f"{prompt_key!r} and {response_key!r} (got fields {sorted(record)})"
        )
    question, response = record[prompt_key], record[response_key]
    try:
        if dataset_format == "gsm8k":
            response = rewrite_gsm8k_answer(response)
        elif dataset_format == "math":
            response = rewrite_math_solution(response)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if dataset_format == "completion":
        return Example(prompt=question, response=response)
    return Example(prompt=format_prompt(question, str(record.get("input") or "")), response=response)


def read_local_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs from a .jsonl or .json file; a bad line names the file and line."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of records")
        return [(f"{path} record {index}", row) for index, row in enumerate(data)]
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"{path} line {number}: malformed JSON ({error.msg}); fix or remove that line"
                raise ValueError(message) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            records.append((f"{path} line {number}", row))
    return records


def read_records(source: str, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Records from a local file, or a hub dataset through `datasets`."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {source!r} does not exist")
        if path.suffix in (".jsonl", ".json"):
            return read_local_records(path)
    try:
        import datasets
    except ImportError:
        raise ImportError("reading hub or parquet/csv datasets needs `pip install datasets`") from None
    if path.is_file():
        loaded = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    else:
        loaded = datasets.load_dataset(source, split=split)
    return [(f"{source} row {index}", dict(row)) for index, row in enumerate(loaded)]


_NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Lily", "Omar", "Nora", "Raj"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "cookies", "stamps"]
_ADD = [("buys {n} more {item}", "buys {n} more"), ("finds {n} more {item}", "finds {n} more"),
        ("gets {n} {item} as a gift", "gets {n} more")]
_SUB = [("gives {n} {item} to a friend", "gives away {n}"), ("loses {n} {item}", "loses {n}"),
        ("uses {n} {item}", "uses {n}")]


def _arithmetic_problem(rng: random.Random, steps: int, max_value: int) -> tuple[str, str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, max_value)
    sentences, lines = [f"{name} has {value} {item}."], [f"{name} starts with {value} {item}."]
    for index in range(steps):
        if value > 1 and rng.random() < 0.5:
            amount = rng.randint(1, value - 1)
            (clause, short), total, sign = rng.choice(_SUB), value - amount, "-"
        else:
            amount = rng.randint(1, max_value)
            (clause, short), total, sign = rng.choice(_ADD), value + amount, "+"
        sentences.append(f"{'Then ' if index else ''}{name} {clause.format(n=amount, item=item)}.")
        lines.append(f"{name} {short.format(n=amount)}, so {value} {sign} {amount} = {total} {item}.")
        value = total
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return question, "\n".join(lines) + f"\nThe answer is: {value}", value


def arithmetic_problems(count: int, seed: int, steps: int = 2, max_value: int = 20) -> list[dict[str, Any]]:
    """`count` seeded word problems: {"instruction", "output", "answer"} with step-by-step solutions."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        question, solution, value = _arithmetic_problem(rng, steps, max_value)
        problems.append({"instruction": question, "output": solution, "answer": value})
    return problems


def subsample(items: list, fraction: float, seed: int) -> list:
    """A seeded random subset of ceil(fraction * len) items, in their original order."""
    if fraction >= 1:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), math.ceil(fraction * len(items))))
    return [items[index] for index in keep]


VAL_SEED = 0  # the held-out split is the same for every run seed, so runs of a study share it


def _read_examples(source: str, dataset_format: str, split: str) -> list[Example]:
    records = read_records(source, split)
    if not records:
        raise ValueError(f"dataset {source!r} holds no records; give a file with at least one example")
    if dataset_format == "auto":
        dataset_format = detect_format(records[0][1], records[0][0])
    return [to_example(row, dataset_format, where) for where, row in records]


def held_out_count(val_set_size: float, total: int) -> int:
    """Examples `val_set_size` holds out of `total`: a fraction below 1, a count from 1 on (axolotl's convention)."""
    if val_set_size <= 0:
        return 0
    count = math.ceil(val_set_size * total) if val_set_size < 1 else int(val_set_size)
    if count >= total:
        raise ValueError(f"val_set_size={val_set_size} leaves no training example out of {total}; hold out fewer")
    return count


def load_splits(config: Any) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) a config asks for, before tokenization.

    The held-out set is `eval_dataset` when given (its `test` split for a hub name), else `val_set_size` examples
    drawn from the training data with a fixed seed (VAL_SEED) before `dataset_fraction` subsamples the rest."""
    if config.dataset is None or config.dataset_format == "arithmetic":
        problems = arithmetic_problems(config.num_examples, config.seed, config.arithmetic_steps,
                                       config.arithmetic_max_value)
        examples = [to_example(row, "alpaca", f"arithmetic problem {index}") for index, row in enumerate(problems)]
    else:
        examples = _read_examples(config.dataset, config.dataset_format, config.dataset_split)
    held_out: list[Example] = []
    eval_dataset = getattr(config, "eval_dataset", None)
    if eval_dataset:
        held_out = _read_examples(eval_dataset, config.dataset_format, "test")
    elif (count := held_out_count(getattr(config, "val_set_size", 0), len(examples))):
        chosen = set(random.Random(VAL_SEED).sample(range(len(examples)), count))
        held_out = [example for index, example in enumerate(examples) if index in chosen]
        examples = [example for index, example in enumerate(examples) if index not in chosen]
    return subsample(examples, config.dataset_fraction, config.seed), held_out


def load_examples(config: Any) -> list[Example]:
    """The training prompt/response pairs a config asks for (before tokenization)."""
    return load_splits(config)[0]


def tokenize(example: Example, tokenizer: Any, cutoff_len: int) -> dict[str, list[int]] | None:
    """input_ids and labels (-100 on the prompt); None when the cutoff leaves no response token."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_all(examples: Iterable[Example], tokenizer: Any, cutoff_len: int) -> list[dict[str, list[int]]]:
    tokenized = [tokenize(example, tokenizer, cutoff_len) for example in examples]
    kept = [item for item in tokenized if item is not None]
    if not kept:
        raise ValueError(f"no example has a response token left within cutoff_len={cutoff_len}; raise cutoff_len")
    return kept


def step_batches(lengths: list[int], global_batch_size: int, micro_batch_size: int, seed: int, epoch: int,
                 group_by_length: bool) -> list[list[list[int]]]:
    """One epoch's plan: a list of optimizer steps, each a list of micro-batches of example indices.

    The last step of an epoch may be smaller than the global batch (nothing is dropped).
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    steps = []
    for start in range(0, len(order), global_batch_size):
        chosen = order[start: start + global_batch_size]
        if group_by_length:
            chosen = sorted(chosen, key=lambda index: -lengths[index])
        steps.append([chosen[i: i + micro_batch_size] for i in range(0, len(chosen), micro_batch_size)])
    return steps


def collate(items: list[dict[str, list[int]]], pad_token_id: int, pad_to_multiple_of: int = 0) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding); the length rounded up to a
    multiple of `pad_to_multiple_of` when it is positive."""
    import torch

    width = max(len(item["input_ids"]) for item in items)
    if pad_to_multiple_of > 0:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        size = len(item["input_ids"])
        input_ids[row, :size] = torch.tensor(item["input_ids"])
        labels[row, :size] = torch.tensor(item["labels"])
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
