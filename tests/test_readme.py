"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(setup)
    assert len(blocks) == 2, blocks
    main_job, tests = blocks
    assert "examples/" in main_job or "gradsynth " in main_job
    assert "pytest" in tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_main_job_script_exists():
    """The main job runs a script in the repository or a console script that pyproject declares."""
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1]
    main_job = _bash_blocks(setup)[0]
    script = re.search(r"python (\S+\.py)", main_job)
    if script:
        assert (ROOT / script.group(1)).is_file()
        return
    command = re.search(r"&& (\S+)", main_job)
    assert command, main_job
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts[command.group(1)].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
