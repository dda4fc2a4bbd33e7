"""The shape of `rasa_lora.ops` a maintainer relies on: no import cycle, the switches in one place, no lab notes.

Imports are read from the source (every `import` / `from ... import`, also those inside functions), so a cycle
hidden behind a function-level import counts too.
"""

import ast
import re
from pathlib import Path

import rasa_lora

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
