"""Safety on a shared machine (issue 20, item 2, and the output-folder cases of item 4).

"Another user" is simulated as root can: a file handed to uid 12345 with ``os.chown``, a folder
made writable by others with ``chmod``, a symbolic link planted at a name the code would write.
Each test reproduces a case that misbehaved before: a planted kernel ran its constructor, a
planted cache entry loaded, a link at a temporary name was written through, an ``--out`` deleted
the input it named, a pre-existing hidden name lost a finished result, the forget data stayed in
the datasets cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gradsynth.rules import native

ROOT = Path(__file__).resolve().parent.parent
OTHER_USER = 12345
FAST = ["--world", "ci", "--steps", "2", "--no-progress"]
# A full kernel library whose constructor leaves a mark: it must never be loaded.
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("GRADSYNTH_TEST_PLANTED");
    FILE *mark = path ? fopen(path, "w") : NULL;
    if (mark) { fputs("ran", mark); fclose(mark); }
}
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")
needs_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")


def _compile(tmp: Path, name: str, code: str, *sources: Path) -> Path:
    source = tmp / f"{name}.c"
    source.write_text(code)
    out = tmp / f"{name}.so"
    command = [native._compiler(), "-O1", "-shared", "-fPIC", "-o", str(out), str(source), *map(str, sources)]
    subprocess.run(command, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A library with every kernel (it would pass the checks) and a constructor that marks a file."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    return _compile(
        tmp_path_factory.mktemp("planted"), "planted", PLANTED_C, native._SOURCE, native._BF16_SOURCE
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- the C kernels' build cache ---------------------------------------------------------------


@needs_cc
def test_a_fresh_build_is_private(fresh_native):
    assert native.library() is not None
    folder = fresh_native / "cache" / "native"
    (library,) = folder.glob("dots-*.so")
    manifest = library.with_name(f"{library.name}.sha256")
    assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(library.stat().st_mode) == 0o600 and stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert manifest.read_text() == _sha256(library)


@needs_cc
@pytest.mark.parametrize("how", ["content", "owner", "manifest", "folder"])
def test_a_library_planted_at_the_cache_name_never_runs(fresh_native, planted, monkeypatch, caplog, how):
    if how != "content" and os.geteuid() != 0:
        pytest.skip("handing a file to another user needs root")
    marker = fresh_native / "ran"
    monkeypatch.setenv("GRADSYNTH_TEST_PLANTED", str(marker))
    # Built, not loaded: the loader would take a second load of a path it knows for the first.
    target = native._build(native._compiler())
    folder = target.parent
    manifest = target.with_name(f"{target.name}.sha256")
    native.reset()
    # The planted code, at the name the next run loads (a new file: the loaded one stays mapped).
    shutil.copy(planted, folder / "plant")
    os.replace(folder / "plant", target)
    if how in ("owner", "manifest", "folder"):
        os.chown(target, OTHER_USER, OTHER_USER)
    if how in ("manifest", "folder"):  # the planter wrote a manifest that matches, too
        manifest.write_text(_sha256(target))
        os.chown(manifest, OTHER_USER, OTHER_USER)
    if how == "folder":
        folder.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="gradsynth.rules.native"):
        loaded = native.library()
    assert not marker.exists(), "the planted library's constructor ran"
    if how == "folder":  # a shared folder is not used at all: the compiled path, one line
        assert loaded is None and "writable by other users" in native.reason()
        assert [r.getMessage() for r in caplog.records if "writable by other users" in r.getMessage()]
        assert native.dots_f32(torch.ones(3), torch.ones(3)) is None
        return
    # In the user's own folder the stray file is replaced by a fresh build of the user's own.
    assert loaded is not None and native.reason() == "built"
    info = target.stat()
    assert info.st_uid == os.geteuid() and _sha256(target) == manifest.read_text() != _sha256(planted)
    assert native.dots_f32(torch.ones(5), torch.full((5,), 2.0)) == (10.0, 20.0)


@needs_cc
def test_a_library_without_the_kernels_is_refused_not_raised(fresh_native, monkeypatch):
    folder = fresh_native / "lib"
    folder.mkdir(mode=0o700)
    library = _compile(folder, "empty", "int gradsynth_nothing(void) { return 0; }\n")
    library.chmod(0o600)
    manifest = library.with_name(f"{library.name}.sha256")
    manifest.write_text(_sha256(library))
    manifest.chmod(0o600)
    monkeypatch.setattr(native, "_build", lambda compiler: library)
    assert native.library() is None
    assert "lacks" in native.reason() and "gradsynth_dots_f32" in native.reason()
    assert native.dots_f32(torch.ones(3), torch.ones(3)) is None
    assert not native.bf16_available()


@needs_cc
def test_an_unwritable_cache_uses_one_private_folder_removed_at_exit(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = (
        "import os, sys\n"
        "from gradsynth.rules import native\n"
        "for _ in range(3):\n"
        "    native.reset()\n"
        "    assert native.library() is not None, native.reason()\n"
        "print(sum(n.startswith('gradsynth-native-') for n in os.listdir(sys.argv[1])))\n"
    )
    env = {**os.environ, "TMPDIR": str(temporary), "GRADSYNTH_CACHE": str(blocker), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(temporary)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"  # one folder for the process, however many builds
    assert [n for n in os.listdir(temporary) if n.startswith("gradsynth-native-")] == []


# ----- the world cache --------------------------------------------------------------------------

pytest.importorskip("transformers")

import gradsynth.world.cache as cache_module  # noqa: E402
from gradsynth.world.cache import cache_key, load_world_model  # noqa: E402
from gradsynth.world.facts import build_world  # noqa: E402
from gradsynth.world.sizes import SIZES  # noqa: E402


def _entry_name() -> str:
    return f"world-ci-{cache_key('ci', build_world(SIZES['ci'], cache_module.WORLD_SEED))}"


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path, monkeypatch, retrained):
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    secret = victim / "secret"
    secret.write_text("mine")
    secret.chmod(0o600)
    # The name a save used to write to (world-*.tmp-<pid>), pointing at the victim's folder.
    (root / f"{_entry_name()}.tmp-{os.getpid()}").symlink_to(victim)
    monkeypatch.setenv("GRADSYNTH_CACHE", str(root))
    *_, info = load_world_model("ci", log=lambda _: None)
    assert [p.name for p in victim.iterdir()] == ["secret"] and secret.read_text() == "mine"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(victim.stat().st_mode) == 0o700
    *_, again = load_world_model("ci", log=lambda _: None)
    assert not info["cached"] and again["cached"] and retrained == ["ci"]


@needs_root
@pytest.mark.parametrize("how", ["entry", "one-file", "writable-entry"])
def test_a_cache_entry_another_user_could_have_written_is_not_loaded(cache, retrained, how):
    entry = next(cache.iterdir())
    if how == "entry":
        for path in [entry, *entry.iterdir()]:
            os.chown(path, OTHER_USER, OTHER_USER)
    elif how == "one-file":
        os.chown(entry / "model.safetensors", OTHER_USER, OTHER_USER)
    else:
        entry.chmod(0o777)
    lines: list[str] = []
    *_, info = load_world_model("ci", log=lines.append)
    assert not info["cached"] and retrained == ["ci"]
    assert "not trusted" in lines[0] and ("another user" in lines[0] or "writable by other users" in lines[0])
    # Replaced by an entry of the user's own, which the next run loads.
    again: list[str] = []
    assert load_world_model("ci", log=again.append)[3]["cached"] and again == [] and retrained == ["ci"]


def test_a_cache_folder_writable_by_others_is_not_used(cache, retrained):
    cache.chmod(0o777)
    before = sorted(p.name for p in cache.iterdir())
    lines: list[str] = []
    *_, info = load_world_model("ci", log=lines.append, shipped=True)
    assert info.get("shipped") and retrained == []  # the package's own model, not the planted one
    assert len(lines) == 1 and "writable by other users" in lines[0] and "not using it" in lines[0]
    lines.clear()
    *_, info = load_world_model("ci", log=lines.append, shipped=False)
    assert not info["cached"] and retrained == ["ci"] and "writable by other users" in lines[0]
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing written into a shared folder


def test_two_cold_runs_train_the_world_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSYNTH_CACHE", str(tmp_path / "cache"))
    trained: list[str] = []

    def slow_pretrain(model, tokenizer, examples, size, seed, progress=None):
        trained.append(size.name)
        time.sleep(1.0)  # long enough for the other run to find the cache cold
        return {"recall": 0.0, "steps": 0}

    monkeypatch.setattr(cache_module, "pretrain", slow_pretrain)
    infos: list[dict] = []
    lines: list[str] = []

    def run_once() -> None:
        infos.append(load_world_model("ci", log=lines.append)[3])

    runs = [threading.Thread(target=run_once) for _ in range(2)]
    for run in runs:
        run.start()
        time.sleep(0.2)
    for run in runs:
        run.join()
    assert trained == ["ci"] and sorted(info["cached"] for info in infos) == [False, True]
    assert any("waiting for it" in line for line in lines)


# ----- output folders ---------------------------------------------------------------------------

pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

from gradsynth.cli import main  # noqa: E402


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradsynth: error: "), err
    for part in parts:
        assert part in err, err
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _qa(path: Path) -> Path:
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}"}) + "\n" for i in range(4)))
    return path


def test_eval_onto_its_own_model_is_refused(cache, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(next(cache.iterdir()), model)
    before = _files(model)
    assert main(["eval", str(model), "--tasks", "world_forget", "--out", str(model), "--overwrite"]) == 2
    _one_line_error(capsys, f"--out {model}: is MODEL")
    assert _files(model) == before


@pytest.mark.parametrize(
    "case", ["model", "forget-folder", "retain-folder", "include-path", "cache", "cache-parent"]
)
def test_unlearn_out_that_is_or_contains_an_input_is_refused(cache, tmp_path, capsys, monkeypatch, case):
    model = tmp_path / "model"
    shutil.copytree(next(cache.iterdir()), model)
    forget, retain = _qa(tmp_path / "f" / "forget.jsonl"), _qa(tmp_path / "r" / "retain.jsonl")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\n")
    argv = ["unlearn", "--model", str(model), "--forget", str(forget), "--retain", str(retain)]
    if case == "include-path":
        argv += ["--eval-tasks", "mine", "--include-path", str(tasks)]
    if case.startswith("cache"):
        argv = ["unlearn", *FAST[:2]]
    if case == "cache-parent":  # the cache inside the folder given as --out
        moved = tmp_path / "home" / "cache"
        moved.parent.mkdir()
        cache = cache.rename(moved)
        monkeypatch.setenv("GRADSYNTH_CACHE", str(cache))
    out, what = {
        "model": (model, "is --model"),
        "forget-folder": (forget.parent, "contains --forget"),
        "retain-folder": (retain.parent, "contains --retain"),
        "include-path": (tasks, "is --include-path"),
        "cache": (cache, "is the gradsynth cache"),
        "cache-parent": (cache.parent, "contains the gradsynth cache"),
    }[case]
    folders = (model, forget.parent, retain.parent, tasks, next(cache.iterdir()))
    before = {p: _files(p) for p in folders}
    assert main([*argv, "--steps", "1", "--no-progress", "--out", str(out), "--overwrite"]) == 2
    _one_line_error(capsys, f"--out {out}: {what}")
    assert {p: _files(p) for p in folders} == before


@pytest.mark.parametrize("where", ["name", "folder"])
def test_an_out_name_longer_than_the_file_system_allows_is_refused_first(
    cache, tmp_path, capsys, monkeypatch, where
):
    called = []
    monkeypatch.setattr("gradsynth.cli.unlearn_command.load_task", lambda *a, **k: called.append(1))
    out = tmp_path / ("x" * 300) if where == "name" else tmp_path / ("x" * 300) / "run"
    assert main(["unlearn", *FAST, "--out", str(out)]) == 2
    _one_line_error(capsys, "300 bytes, longer than this file system allows", "give a shorter name")
    assert called == []


def test_a_long_out_name_the_file_system_accepts_works(cache, tmp_path, capsys):
    out = tmp_path / ("r" * 250)  # its hidden staging names would have been longer than 255 bytes
    assert main(["unlearn", *FAST, "--out", str(out)]) == 0
    assert (out / "report.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == [out.name]


def test_a_pre_existing_old_name_is_left_alone_and_the_result_kept(cache, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "previous.txt").write_text("old run")
    squatter = tmp_path / f".run.old-{os.getpid()}"  # the name the old folder used to be moved to
    squatter.mkdir()
    (squatter / "theirs.txt").write_text("not ours")
    assert main(["unlearn", *FAST, "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.json").is_file() and not (out / "previous.txt").exists()
    assert _files(squatter) == {"theirs.txt": b"not ours"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".run.old-" + str(os.getpid()), "cache", "run"]
    )


def test_a_symlinked_out_is_refused_and_left_as_it_was(cache, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    (target / "previous.txt").write_text("old run")
    link = tmp_path / "run"
    link.symlink_to(target)
    assert main(["unlearn", *FAST, "--out", str(link), "--overwrite"]) == 2
    _one_line_error(capsys, "is a symbolic link", "give the folder itself")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _files(target) == {"previous.txt": b"old run"}


# ----- the forget and retain data ---------------------------------------------------------------


def test_the_forget_file_leaves_nothing_in_the_datasets_cache(tmp_path):
    forget = tmp_path / "forget.jsonl"
    secret = "the-private-answer-7f3a"
    forget.write_text(json.dumps({"question": "Who?", "answer": secret}) + "\n")
    forget.chmod(0o600)
    hf, temporary = tmp_path / "hf", tmp_path / "tmp"
    temporary.mkdir()
    env = {
        **os.environ,
        "HF_HOME": str(hf),
        "HF_DATASETS_CACHE": str(hf / "datasets"),
        "TMPDIR": str(temporary),
        "PYTHONPATH": str(ROOT),
    }
    code = (
        "import sys\n"
        "from gradsynth.unlearning.data import load_examples\n"
        "print(load_examples(sys.argv[1], '--forget')[0].answer)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(forget)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == secret, done.stderr
    left = [
        p
        for folder in (hf, temporary)
        for p in folder.rglob("*")
        if p.is_file() and secret.encode() in p.read_bytes()
    ]
    assert left == []
