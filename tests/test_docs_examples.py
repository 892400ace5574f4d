"""Every Python example in the docs runs, page by page, in one namespace per page.

Each page defines what its snippets use (no hidden prelude), so a snippet that uses a name no
earlier block of its page defines fails here with a ``NameError``. Blocks fenced ``python`` are
run; blocks fenced ``py`` (illustrations that need several processes or a user's own objects)
are compiled, so at least their syntax is checked. Warnings are errors, so that a recipe that,
say, misorders scheduler and optimizer fails here.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _blocks(text: str, fence: str) -> list[str]:
    blocks = re.findall(rf"^( *)```{fence}(?: [^\n]*)?\n(.*?)^\1```", text, flags=re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in code.splitlines()) for indent, code in blocks]


def run_page(text: str, name: str) -> int:
    """Run a page's ``python`` blocks in one fresh namespace and compile its ``py`` blocks; returns
    how many blocks ran."""
    for i, code in enumerate(_blocks(text, "py")):
        compile(code, f"{name}[py block {i}]", "exec")
    blocks = _blocks(text, "python")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # peft itself still asks the model the pre-v5 question (not the docs' doing).
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        # torch's own modules warn about torch's internals when first imported (torch.jit, while
        # the compiler loads): whether that happens here depends on which test ran first.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        for i, code in enumerate(blocks):
            exec(compile(code, f"{name}[block {i}]", "exec"), namespace)
    return len(blocks)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a relative path writes here
    run_page(page.read_text(), page.name)


def test_a_snippet_with_an_undefined_name_fails():
    page = (
        "```python\nimport torch\n```\n\ntext\n\n```python\nopt = torch.optim.SGD(model.parameters())\n```\n"
    )
    with pytest.raises(NameError, match="model"):
        run_page(page, "page.md")
    assert run_page("```python\nx = 1\n```\n\n```python\nassert x == 1\n```\n", "page.md") == 2
    with pytest.raises(SyntaxError):
        run_page("```py title='an illustration'\ndef broken(:\n```\n", "page.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_examples_write_only_into_temporary_folders(page):
    """A saved file named by a bare relative path lands in the reader's working folder."""
    saves = re.findall(
        r"""torch\.save\([^,]+,\s*["']([^"']+)["']""", "\n".join(_blocks(page.read_text(), "python"))
    )
    assert saves == [], f"{page.name} saves to {saves}; save into tempfile.mkdtemp() instead"
