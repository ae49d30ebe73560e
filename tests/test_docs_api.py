"""docs/python-api.md stays true: its Python blocks run, in order, in one namespace."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_every_python_block_of_the_api_guide_runs(tmp_path, monkeypatch):
    """The guide's code blocks run top to bottom without error and end with a saved project."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        code = compile(block, f"{DOC.name}[block {i}]", "exec")
        exec(code, namespace)
    assert (tmp_path / "project.h5ad").is_file()
    assert (tmp_path / "probe.npz").is_file()
