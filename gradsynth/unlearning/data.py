"""Reading forget/retain sets from files through ``datasets``.

Accepted: ``.jsonl``/``.json``, ``.csv``, ``.parquet`` and ``.txt`` (one example per line). Each
row needs either a ``text`` column (labelled on every token) or ``question`` and ``answer``
columns (labelled on the answer only). Every problem is raised as `DataError` with a message
that names the file and the fix.

A path is a file name, never a pattern: JSON is read by `gradsynth.unlearning.jsonl` (literal
path, nesting guarded), and the path handed to ``datasets`` for the other formats has its glob
characters escaped (``forget[1].csv`` is that file, not ``forget1.csv``). ``datasets``' and
transformers' loggers are silenced while it reads, so that a failure is the one line we print.
"""

from __future__ import annotations

import codecs
import glob
import tempfile
from pathlib import Path
from typing import Any

from gradsynth.unlearning.encoding import Example, prompt_of
from gradsynth.unlearning.jsonl import JsonRowsError, read_json_rows
from gradsynth.unlearning.quiet import quiet_loggers

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataError(ValueError):
    """A data file that cannot be used, with the reason and the fix."""


def _check_utf8(path: Path, what: str) -> None:
    """Refuse a text file that is not UTF-8 here: ``datasets`` decodes lazily, outside any check."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{what} {path}: not UTF-8 text (byte 0x{chunk[err.start]:02x} at offset "
                    f"{offset + err.start}); save the file as UTF-8"
                ) from err
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path}: not UTF-8 text (it ends mid-character); save it as UTF-8") from err


def _read_table(path: Path, builder: str, what: str) -> dict[str, list[Any]]:
    """The file's rows as ``{column: values}``; the path is taken literally."""
    if builder == "json":
        try:
            return read_json_rows(path, what)
        except JsonRowsError as err:
            raise DataError(str(err)) from err
    import datasets

    datasets.disable_progress_bars()
    # datasets resolves data_files as glob patterns: escape them so the name means this one file.
    literal = glob.escape(str(path.resolve()))
    try:
        # A private cache removed at once, the table kept in memory: nothing of the forget or
        # retain data is left in the shared datasets cache (which is readable by others).
        with quiet_loggers(), tempfile.TemporaryDirectory(prefix="gradsynth-data-") as private:
            table = datasets.load_dataset(
                builder, data_files=literal, split="train", cache_dir=private, keep_in_memory=True
            )
    except Exception as err:
        cause = err.__cause__ or err  # datasets wraps the parser's error in a generic one
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"{what} {path}: could not be read as {builder} ({reason[:200]})") from err
    return {name: table[name] for name in table.column_names}


def _string(value: Any, column: str, row: int, what: str, path: Path) -> str:
    """A cell as text: strings as they are, numbers written out; anything else is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = "missing (null)" if value is None else f"a {type(value).__name__}, not a string"
    raise DataError(f"{what} {path}: row {row}: '{column}' is {kind}; give a string in every row")


def load_examples(path: str | Path, what: str = "data") -> list[Example]:
    """The examples in ``path``; ``what`` names the file in error messages (e.g. ``"--forget"``)."""
    path = Path(path)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{what} {path}: unsupported file type; use one of {', '.join(sorted(BUILDERS))}")
    if not path.is_file():
        raise DataError(f"{what} {path}: no such file")
    try:
        with path.open("rb") as handle:
            empty = not handle.read(1)
    except OSError as err:
        raise DataError(f"{what} {path}: cannot be read ({err.strerror}); check its permissions") from err
    if empty:
        raise DataError(f"{what} {path}: the file has no rows; give at least one example")
    if builder != "parquet":
        _check_utf8(path, what)
    table = _read_table(path, builder, what)
    columns = set(table)
    if not table or not any(len(values) for values in table.values()):
        raise DataError(f"{what} {path}: the file has no rows; give at least one example")
    if {"question", "answer"} <= columns:
        return [
            Example(prompt_of(_string(q, "question", row, what, path)), _string(a, "answer", row, what, path))
            for row, (q, a) in enumerate(zip(table["question"], table["answer"], strict=True), start=1)
        ]
    if "text" in columns:
        texts = [
            _string(t, "text", row, what, path)
            for row, t in enumerate(table["text"], start=1)
            if t is not None  # blank lines and empty cells are skipped, as in a text file
        ]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise DataError(f"{what} {path}: every 'text' is empty; give at least one example")
        return [Example(t) for t in texts]
    raise DataError(
        f"{what} {path}: has columns {sorted(columns)}; it needs a 'text' column or "
        "'question' and 'answer' columns"
    )
