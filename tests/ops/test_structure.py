"""The shape of `rasa_lora.ops` a maintainer relies on: no import cycle, the switches in one place, no lab notes.

Imports are read from the source (every `import` / `from ... import`, also those inside functions), so a cycle
hidden behind a function-level import counts too.
"""

import ast
import re
from pathlib import Path

import pytest
import torch

import rasa_lora
from rasa_lora.ops import plans

PACKAGE = Path(rasa_lora.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The rasa_lora modules `path` imports (a `from package import name` of a submodule counts as that module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def _graph(prefix: str) -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items() if name.startswith(prefix)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the graph's modules (a package importing its own submodules for re-export is no cycle: the
    package's `__init__` runs first), or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph or node.startswith(nxt + "."):  # outside, or the module's own parent package
                continue
            if state.get(nxt) == 1:
                return path + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_ops_and_settings_have_no_import_cycle():
    graph = _graph("rasa_lora.ops")
    graph.update(_graph("rasa_lora.settings"))
    assert _cycle(graph) is None, _cycle(graph)
    assert not _graph("rasa_lora.settings")["rasa_lora.settings"]  # settings imports no rasa_lora module


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_env_flag_is_the_settings_one():
    """One reading rule for boolean environment variables: no module defines its own."""
    own = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
           if p.name != "settings.py" and re.search(r"^def _?env_flag\(", p.read_text(), re.MULTILINE)]
    assert not own, own


FLAGS = {"DROPOUT", "ATOMIC", "IEEE", "PACKED", "ACCUMULATE", "BIAS", "GU16", "SEED_PTR"}


def _check_arguments(kernel: str, names: list[str], args: tuple) -> None:
    """Each argument of a positional launch has the kind its name says: pointers are tensors, flags bools, the
    dropout scale a float, the rest (sizes, strides, tiles, splits, the seed's hash and threshold) ints."""
    assert len(args) == len(names), (kernel, len(args), len(names))
    for name, value in zip(names, args):
        if name.endswith("_ptr"):
            expected = torch.Tensor
        elif name in FLAGS:
            expected = bool
        elif name == "scale":
            expected = float
        else:
            expected = int
        ok = isinstance(value, expected) and (expected is not int or not isinstance(value, bool))
        assert ok, (kernel, name, type(value).__name__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_launch_passes_the_kernels_arguments_in_order(dtype, monkeypatch):
    """Launches are positional (binding by name costs host time: docs/performance.md, record 11); this checks
    every launch of the Triton backend's stages against the kernel's argument names, kernels stubbed."""
    from rasa_lora.ops import kernels

    if not kernels.available():
        pytest.skip("needs triton (its kernels' argument names)")
    from rasa_lora.ops import launch, triton_backend

    seen = set()

    class Recording:
        def __init__(self, name, launcher):
            self.name, self.names = name, launcher.fn.arg_names

        def __call__(self, grid, args, warps, stages):
            _check_arguments(self.name, self.names, args)
            seen.add(self.name)

    for name, launcher in list(vars(launch).items()):
        if isinstance(launcher, launch.Launcher):
            monkeypatch.setattr(launch, name, Recording(name, launcher))
    M, K, N, NP, NS = 40, 96, 72, 5, 20
    x, g = torch.randn(M, K, dtype=dtype), torch.randn(M, N, dtype=dtype)
    factors = [torch.randn(*shape) for shape in ((NP, K), (N, NP), (NP + NS,), (NS, K), (N, NS))]
    for split in (0, 3):
        changes = {name: {"splits": split} for name in ("down", "bwd_up", "ga", "up", "gx")}
        for pack in ("fused", "separate"):
            changes["down"]["pack"] = pack
            with plans.configs(changes):
                u, A, C = triton_backend.down_and_pack(x, *factors, 1.25, 7, 300, True)
                triton_backend.pack(*factors, dtype, 1.25)
                for bias in (None, torch.randn(N, dtype=dtype)):
                    triton_backend.up_(torch.empty(M, N, dtype=dtype), u, C, accumulate=bias is None, bias=bias)
                R = C.shape[1]
                grads = triton_backend.workspaces("cpu", M, K, N, NP, NS, R, dtype)
                triton_backend.bwd_up(g, C, u, grads[3], grads[4], NP + NS)
                for grad_x in (torch.empty(M, K, dtype=dtype), None):
                    triton_backend.bwd_down(x, grads[3], A, grad_x, grads[0], grads[5], grads[4], factors[1],
                                            factors[4], factors[2], grads[2], grads[1], grads[6], 1.25, 7, 300, True,
                                            gu16=grads[7])
    seed = torch.tensor([5])  # the seed read by the kernels from memory (registered operators, CUDA graphs)
    u, A, C = triton_backend.down_and_pack(x, *factors, 1.25, 0, 300, True, seed)
    triton_backend.bwd_down(x, grads[3], A, torch.empty(M, K, dtype=dtype), grads[0], grads[5], grads[4], factors[1],
                            factors[4], factors[2], grads[2], grads[1], grads[6], 1.25, 0, 300, True, seed,
                            gu16=grads[7])
    triton_backend.keep_mask(M, K, 0, 300, "cpu", seed)
    triton_backend.keep_mask(M, K, 7, 300, "cpu")
    assert seen == {"DOWN_PACK", "UP_ROWS", "BWD_UP", "GX_ROWS", "GA_FINALIZE", "KEEP_MASK"}  # every launcher


LAB_NOTES = re.compile(r"\b[Ss]ession \d+|\b20\d\d-\d\d-\d\d\b|\b\d+(\.\d+)?\s?(ms|us|µs)\b|\bH[12]00\b|\brun [A-Z]\b")


def _comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a module."""
    import io
    import tokenize

    found = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
        elif token.type == tokenize.STRING and token.string.lstrip("rbuRBU").startswith(('"""', "'''")):
            found.append((token.start[0], token.string))
    return found


def test_src_comments_carry_no_work_log_numbers_dates_or_timings():
    """Measurements and their history live in docs/performance.md (numbered records) and benchmarks/RESULTS.md; the
    code cites a record's number. No session numbers, dates, millisecond or microsecond timings, GPU models."""
    hits = [f"{path.relative_to(PACKAGE)}:{line}: {LAB_NOTES.search(text).group(0)!r}"
            for path in sorted(PACKAGE.rglob("*.py")) for line, text in _comments_and_docstrings(path)
            if LAB_NOTES.search(text)]
    assert not hits, "\n".join(hits)


def test_the_lab_note_pattern_catches_what_it_should():
    for note in ("(session 7)", "2026-11-29", "20 ms less", "~15-25 us a launch", "on one H200", "run C"):
        assert LAB_NOTES.search(note), note
    for fine in ("docs/performance.md, record 6", "in bf16", "programs per SM", "4096 tokens"):
        assert not LAB_NOTES.search(fine), fine


def test_no_ops_module_reaches_400_lines():
    """`ops/` stays readable module by module (issue 23): the size of each module and what remains in it, per
    module, is in docs/performance.md, "The size of ops/"."""
    sizes = {path.name: len(path.read_text().splitlines()) for path in (PACKAGE / "ops").glob("*.py")}
    assert sizes and max(sizes.values()) < 400, sizes
