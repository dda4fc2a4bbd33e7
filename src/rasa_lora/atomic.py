"""Files written whole or not at all: through a hidden partial file in the same folder, then a rename."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path | str, content: str | Callable[[Path], object]) -> None:
    """Write `content` (text, or a function that writes the file at the path it is given) to `path` so that a crash
    never leaves a half-written file there. The partial file keeps `path`'s suffix (matplotlib picks the format
    from it)."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    if callable(content):
        content(partial)
    else:
        partial.write_text(content)
    partial.replace(path)
