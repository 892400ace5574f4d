"""Every Python example in the docs runs, page by page, in one namespace per page.

A short prelude provides what the snippets assume the reader has: a model and its two losses.
Warnings are errors, so that a recipe that, say, misorders scheduler and optimizer fails here.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
PRELUDE = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Linear(4, 2)
_x = torch.randn(3, 4)
lf = -model(_x).pow(2).mean()
lr = model(_x).pow(2).mean()
"""


def _python_blocks(text: str) -> list[str]:
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in code.splitlines()) for indent, code in blocks]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a relative path writes here
    blocks = _python_blocks(page.read_text())
    namespace: dict = {}
    exec(PRELUDE, namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, code in enumerate(blocks):
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_examples_write_only_into_temporary_folders(page):
    """A saved file named by a bare relative path lands in the reader's working folder."""
    saves = re.findall(
        r"""torch\.save\([^,]+,\s*["']([^"']+)["']""", "\n".join(_python_blocks(page.read_text()))
    )
    assert saves == [], f"{page.name} saves to {saves}; save into tempfile.mkdtemp() instead"
