"""The README's Python example runs as written."""
import os
import re
from pathlib import Path

import pytest


def test_readme_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert (tmp_path / "out/my-adapter/adapter_model.safetensors").is_file()
    assert ns["peft_model"] is not None
