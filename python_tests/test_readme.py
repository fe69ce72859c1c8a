"""The README's Python snippets run as written (each in a fresh namespace)."""

import importlib.util
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def snippets():
    with open(README) as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python snippets"
    return blocks


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(index):
    code = snippets()[index]
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "readme"})
