"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

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
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1]
    main_job = _bash_blocks(setup)[0]
    script = re.search(r"python (\S+\.py)", main_job)
    assert script and (ROOT / script.group(1)).is_file()
