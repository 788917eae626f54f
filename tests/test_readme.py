"""The README's Python snippets run as written (offline, in a scratch folder).

Blocks fenced as ```python are executed in order, sharing one namespace; blocks fenced as ```py are
shown only (they need the Hub or a GPU).
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippets_run(tmp_path, monkeypatch, hf_home) -> None:
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert snippets, "README.md has no ```python snippets"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102
