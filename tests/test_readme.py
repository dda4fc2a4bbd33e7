"""The README's Python snippet runs as printed (in a fresh process, so `import rasa_lora`'s lazy registration and
the line that loads `base` are exercised), with its "train" line left out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_readme_snippet_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    snippet = re.search(r"## Use it\n\n```python\n(.*?)```", text, re.S).group(1)
    assert 'base = load_model("smollm2")' in snippet  # the snippet says how `base` is loaded
    code = "\n".join(line for line in snippet.splitlines() if not line.startswith("..."))
    code += "\nprint(type(merged).__name__, sorted(os.listdir('adapter')))"
    result = subprocess.run([sys.executable, "-c", "import os\n" + code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("LlamaForCausalLM") and "adapter_model.safetensors" in result.stdout
