"""Math answers: extraction from a generation, and two equivalence verdicts (math-verify and Minerva/sympy).

Extraction: the text after the last "The answer is:" (the authors' MetaMathQA format; also without the colon, "The
final answer is", any case), else after the last "#### ", else the content of the last `\\boxed{...}` (balanced
braces), else nothing.

Verdicts, both stored per item:
- `math_verify`: Hugging Face's `math-verify` (`parse` both sides, `verify(gold, prediction)`; the order
  matters). It uses SIGALRM for its timeouts, so it must run in a main thread: `judge_many` runs it in a pool of
  worker processes.
- `minerva`: lm-eval 0.4.13's `minerva_math` checker (`MINERVA_REFERENCE`): `normalize_final_answer` (Minerva's
  substitutions and removed unit words, `\\text{}`, `\\boxed{}`, shorthand `\\frac12`/`\\sqrt2` fixes), then equal
  when the normalised strings are equal, else when both parse as LaTeX and `sympy.simplify(a - b) == 0`. lm-eval
  parses with sympy's `parse_latex`, which needs `antlr4-python3-runtime` 4.11; so do we when that runtime is
  installed (`pip install "math-verify[antlr4_11_0]"`, which math-verify works with too). With the 4.13 runtime
  of math-verify's default install we parse with `latex2sympy2_extended.latex2sympy` instead, which can differ
  on items that are not string-equal (`minerva_parser()` says which one ran; the summary stores it).
  A 5 s limit per comparison, as lm-eval.

GSM8K gold answers are plain numbers; both checkers handle them (math-verify with its expression extraction).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor


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


_MARKER = re.compile(r"(?i)\bthe\s+(?:final\s+)?answer\s+is\s*:?")
_HASHES = re.compile(r"####\s*([^\n]+)")


def _clean(answer: str) -> str | None:
    answer = answer.split("\n")[0].split("I hope it is correct")[0].strip()
    boxed = last_boxed_content(answer)
    answer = boxed if boxed is not None else answer
    answer = answer.strip().rstrip(".").strip().strip("$").strip().rstrip(".").strip()
    return answer or None


def extract_answer(generation: str) -> str | None:
    """The final answer of a generation: after the last "The answer is" (the authors' "The answer is: X", and the
    forms models also write: no colon, "The final answer is", any case, a trailing period, `$...$` or `\\boxed{}`
    around the answer), else after the last GSM8K-style "#### ", else the last boxed content."""
    markers = list(_MARKER.finditer(generation))
    if markers:
        answer = _clean(generation[markers[-1].end():])
        if answer is not None:
            return answer
    for found in reversed(_HASHES.findall(generation)):  # the last "#### " with an answer (a cut-off one has none)
        answer = _clean(found)
        if answer is not None:
            return answer
    return last_boxed_content(generation)


# --- Minerva / lm-eval normalisation ------------------------------------------------------------------------------
# Behaviour of lm-eval 0.4.13's `minerva_math` (`normalize_final_answer`, `is_equiv`), checked item for item
# against it in tests/evaluation/test_math_check.py and benchmarks/math_agreement.py.
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
            r",\!", "{,}", '"', "\\dots"]
_UNIT_WORDS = [word for word in _REMOVED if word.isalpha()]
_COMMAND = re.compile(r"(\\[a-zA-Z]+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+")
MINERVA_REFERENCE = "lm-eval 0.4.13 minerva_math"


def _outside_commands(text: str, word: str) -> str:
    """Remove `word` everywhere except inside LaTeX command names (so "ft" leaves `\\left` alone)."""
    pieces = _COMMAND.split(text)
    return "".join(piece if i % 2 else piece.replace(word, "") for i, piece in enumerate(pieces))


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (Lewkowycz et al. 2022, App. D) as lm-eval 0.4.13 applies it.

    Unit words go first where whitespace still delimits them (never after a backslash), then the substitutions,
    then the remaining removals (unit words only outside command names); then `$...$`, `\\text{}`, `\\textbf{}`,
    `\\overline{}` and `\\boxed{}` are unwrapped, shorthand `\\frac12`, `\\sqrt2` and `\\sqrt[3]2` get braces,
    and commas go only when they are thousands separators ("1,000", not the tuple "0,1").
    """
    answer = answer.split("=")[-1]
    for word in _UNIT_WORDS:
        answer = re.sub(rf"(?<!\\)\b{word}\b", "", answer)
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in _REMOVED:
        answer = _outside_commands(answer, removed) if removed in _UNIT_WORDS else answer.replace(removed, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for command in ("text", "textbf", "overline"):
        answer = re.sub(rf"(\\{command}\{{)(.*?)(\}})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", answer)
    answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


@functools.cache
def minerva_parser() -> str:
    """The LaTeX parser the Minerva verdict uses here: "sympy" (lm-eval's own, sympy's `parse_latex`, which needs
    antlr4-python3-runtime 4.11) when that runtime is installed, else "latex2sympy" (`latex2sympy2_extended`,
    installed with math-verify, which works with the 4.13 runtime math-verify's default install brings)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "sympy" if version("antlr4-python3-runtime").startswith("4.11") else "latex2sympy"
    except PackageNotFoundError:
        return "latex2sympy"


def _parse_latex(text: str, parser: str | None = None):
    if (parser or minerva_parser()) == "sympy":
        from sympy.parsing.latex import parse_latex

        return parse_latex(text)
    from latex2sympy2_extended import latex2sympy

    return latex2sympy(text)


def minerva_equivalent(prediction: str, gold: str, parser: str | None = None) -> bool:
    """lm-eval's `is_equiv` on two normalised answers: equal non-empty strings are equal; otherwise both are parsed
    as LaTeX and equal when `sympy.simplify(prediction - gold) == 0`. Any parse or algebra error is "not equal".
    `parser`: "sympy" or "latex2sympy" (default: `minerva_parser()`)."""
    import sympy

    if prediction and prediction == gold:
        return True
    try:
        return bool(sympy.simplify(_parse_latex(prediction, parser) - _parse_latex(gold, parser)) == 0)
    except Exception:  # noqa: BLE001 - any parse or algebra failure is a "not equal", as in lm-eval
        return False


def _minerva_equal(gold: str, prediction: str) -> bool:
    return minerva_equivalent(normalize_final_answer(prediction), normalize_final_answer(gold))


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
