"""Math answers: extraction from a generation, and two equivalence verdicts (math-verify and Minerva/sympy).

Extraction: the text after the last "The answer is:" (the authors' MetaMathQA format), else the content of the
last `\\boxed{...}` (balanced braces), else nothing.

Verdicts, both stored per item:
- `math_verify`: Hugging Face's `math-verify` (`parse` both sides, `verify(gold, prediction)`; the order
  matters). It uses SIGALRM for its timeouts, so it must run in a main thread: `judge_many` runs it in a pool of
  worker processes.
- `minerva`: lm-eval's `minerva_math` checker: `normalize_final_answer` (Minerva's substitutions and removed
  unit words, `\\text{}`, `\\boxed{}`, shorthand `\\frac12`/`\\sqrt2` fixes), then both sides are parsed as LaTeX
  and judged equal when `sympy.simplify(a - b) == 0`, with no string comparison first (so identical tuples,
  intervals or matrices that sympy cannot subtract are judged wrong, as in lm-eval). One deviation: lm-eval parses
  with `sympy.parsing.latex.parse_latex`, which needs `antlr4-python3-runtime==4.11`, while `math-verify` needs
  4.13; we parse with `latex2sympy2_extended.latex2sympy` (installed with math-verify), an ANTLR LaTeX-to-sympy
  parser. A 5 s limit per comparison, as lm-eval.

GSM8K gold answers are plain numbers; both checkers handle them (math-verify with its expression extraction).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

ANSWER_MARKER = "The answer is:"


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces; `\\boxed x` forms too."""
    index = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if index < 0:
        return None
    rest = text[index:]
    if rest.startswith("\\boxed "):
        return rest[len("\\boxed "):].split("$")[0].strip()
    start = rest.find("{")
    if start < 0:
        return None
    depth = 0
    for position in range(start, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[position], 0)
        if depth == 0:
            return rest[start + 1:position]
    return None


def extract_answer(generation: str) -> str | None:
    """The final answer of a generation: after the last "The answer is:", else the last boxed content."""
    if ANSWER_MARKER in generation:
        answer = generation.rsplit(ANSWER_MARKER, 1)[1].strip()
        answer = answer.split("\n")[0].strip()
        boxed = last_boxed_content(answer)
        answer = boxed if boxed is not None else answer
        return answer.rstrip(".").strip().strip("$").strip() or None
    return last_boxed_content(generation)


# --- Minerva / lm-eval normalisation -------------------------------------------------------------------------------
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
            r",\!", "{,}", '"', "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (Lewkowycz et al. 2022, App. D; lm-eval `minerva_math`)."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in _REMOVED:
        answer = answer.replace(removed, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def _minerva_equal(gold: str, prediction: str) -> bool:
    import sympy
    from latex2sympy2_extended import latex2sympy

    try:
        difference = latex2sympy(normalize_final_answer(prediction)) - latex2sympy(normalize_final_answer(gold))
        return bool(sympy.simplify(difference) == 0)
    except Exception:  # noqa: BLE001 - any parse or algebra failure is a "not equal", as in lm-eval
        return False


def _math_verify_equal(gold: str, prediction: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:  # math-verify sets its own SIGALRM timeouts (5 s each), so no alarm of ours around it
        gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=configs)
        pred_parsed = parse("\\boxed{" + prediction + "}", extraction_config=configs)
        return bool(verify(gold_parsed, pred_parsed))
    except Exception:  # noqa: BLE001 - math-verify failures count as "not equal"
        return False


def _with_alarm(seconds: int, function, *args) -> bool:
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return function(*args)
    except TimeoutError:
        return False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def judge(gold: str, prediction: str | None) -> dict[str, bool]:
    """Both verdicts for one item (call from a main thread: both use SIGALRM)."""
    if prediction is None or not prediction.strip():
        return {"math_verify": False, "minerva": False}
    return {"math_verify": _math_verify_equal(gold, prediction),
            "minerva": _with_alarm(5, _minerva_equal, gold, prediction)}


def _judge_pair(pair: tuple[str, str | None]) -> dict[str, bool]:
    return judge(*pair)


def judge_many(pairs: Iterable[tuple[str, str | None]], workers: int = 2,
               pool: ProcessPoolExecutor | None = None) -> list[dict[str, bool]]:
    """Verdicts for (gold, prediction) pairs, in order, computed in worker processes (`pool`, or a new one)."""
    pairs = list(pairs)
    if pool is not None:
        return list(pool.map(_judge_pair, pairs, chunksize=8))
    with ProcessPoolExecutor(max_workers=workers) as own_pool:
        return list(own_pool.map(_judge_pair, pairs, chunksize=8))


def answer_shape(answer: str) -> str:
    """A coarse kind of a gold answer, to group checker disagreements: matrix, interval, tuple, +-, set, ..."""
    if "pmatrix" in answer or "bmatrix" in answer:
        return "matrix"
    if "\\pm" in answer:
        return "plus-minus"
    if "\\{" in answer:
        return "set"
    if "\\infty" in answer or "\\cup" in answer or re.search(r"[\[(].*,.*[\])]", answer) and (
            answer.strip().endswith("]") or answer.strip().startswith("[") or "\\in" in answer):
        return "interval"
    if "," in answer:
        return "tuple or list"
    if "\\text" in answer:
        return "text or units"
    if re.search(r"\\frac\d|\\frac\{[^}]*\}\d", answer):
        return "shorthand fraction"
    return "other"
