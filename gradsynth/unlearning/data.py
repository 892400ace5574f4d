"""Reading forget/retain/evaluation sets into `Example` lists: files, ``datasets`` folders, Hub ids.

A source is a file (``.jsonl``/``.json``, ``.csv``, ``.parquet`` and ``.txt``, one example per
line), a ``datasets`` folder (``FOLDER`` or ``FOLDER:SPLIT``) or a Hub dataset from the local
cache (``hub:ORG/NAME[/CONFIG][:SPLIT]``); `gradsynth.unlearning.data_sources` parses and reads the
last two. Each row is mapped by the first schema whose columns it has (`SCHEMAS`):

- ``question`` + ``answer`` (TOFU, MUSE knowmem): labelled on the answer only;
- ``query`` + ``answer`` (RWKU's probes, cloze ``___`` queries included): the query is the question;
- ``text`` (MUSE and WMDP corpora, plain text files): labelled on every token.

``columns={"question": "prompt", "answer": "gt"}`` names other columns for those roles. Every
problem is raised as `DataError` with a message that names the source and the fix.

A path is a file name, never a pattern: JSON is read by `gradsynth.unlearning.jsonl` (literal
path, nesting guarded), and the path handed to ``datasets`` for the other formats has its glob
characters escaped (``forget[1].csv`` is that file, not ``forget1.csv``). ``datasets``' and
transformers' loggers are silenced while it reads, so that a failure is the one line we print.
"""

from __future__ import annotations

import codecs
import glob
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradsynth.unlearning.data_sources import DataError, parse_source, read_dataset
from gradsynth.unlearning.encoding import Example, prompt_of
from gradsynth.unlearning.jsonl import JsonRowsError, read_json_rows
from gradsynth.unlearning.quiet import quiet_loggers

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

#: The column sets a row is read by, first match wins, with the benchmarks that use them.
SCHEMAS = (
    (("question", "answer"), "TOFU, MUSE knowmem"),
    (("query", "answer"), "RWKU probes"),
    (("text",), "MUSE/WMDP corpora"),
)
ROLES = ("question", "answer", "text")

__all__ = ["BUILDERS", "SCHEMAS", "DataError", "examples_from_dataset", "load_examples"]


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


def _string(value: Any, column: str, row: int, where: str) -> str:
    """A cell as text: strings as they are, numbers written out; anything else is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = "missing (null)" if value is None else f"a {type(value).__name__}, not a string"
    raise DataError(f"{where}: row {row}: '{column}' is {kind}; give a string in every row")


def _accepted() -> str:
    return ", ".join(" and ".join(f"'{c}'" for c in cols) + f" ({used})" for cols, used in SCHEMAS)


def _renamed(table: dict[str, Any], columns: Mapping[str, str] | None, where: str) -> dict[str, Any]:
    """``table`` with the user's ``columns`` ({role: column}) under the role names."""
    if not columns:
        return table
    unknown = sorted(set(columns) - set(ROLES))
    if unknown:
        raise ValueError(f"columns: unknown role {unknown[0]!r}; the roles are {', '.join(ROLES)}")
    absent = sorted(column for column in columns.values() if column not in table)
    if absent:
        raise DataError(f"{where}: no column '{absent[0]}' (from columns=); it has columns {sorted(table)}")
    chosen = set(columns.values())
    kept = {name: values for name, values in table.items() if name not in columns or name in chosen}
    return {**kept, **{role: table[column] for role, column in columns.items()}}


def examples_of_table(
    table: dict[str, Any], where: str, columns: Mapping[str, str] | None = None
) -> list[Example]:
    """The examples of ``{column: values}`` by the first matching schema; ``where`` opens every error."""
    table = _renamed(table, columns, where)
    if not table or not any(len(values) for values in table.values()):
        raise DataError(f"{where}: the set has no rows; give at least one example")
    for schema, _ in SCHEMAS:
        if set(schema) <= set(table) and len(schema) == 2:
            question, answer = schema
            return [
                Example(prompt_of(_string(q, question, row, where)), _string(a, answer, row, where))
                for row, (q, a) in enumerate(zip(table[question], table[answer], strict=True), start=1)
            ]
    if "text" in table:
        texts = [
            _string(t, "text", row, where)
            for row, t in enumerate(table["text"], start=1)
            if t is not None  # blank lines and empty cells are skipped, as in a text file
        ]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise DataError(f"{where}: every 'text' is empty; give at least one example")
        return [Example(t) for t in texts]
    raise DataError(
        f"{where}: has columns {sorted(table)}; it needs {_accepted()}; rename them, or map them with "
        "load_examples(..., columns={'question': ..., 'answer': ...})"
    )


def examples_from_dataset(
    dataset: Any, what: str = "data", columns: Mapping[str, str] | None = None
) -> list[Example]:
    """The examples of a ``datasets.Dataset`` (or any ``{column: values}`` mapping)."""
    names = getattr(dataset, "column_names", None)
    table = {name: dataset[name] for name in names} if names is not None else dict(dataset)
    return examples_of_table(table, what, columns)


def _read_file(path: Path, what: str) -> dict[str, list[Any]]:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        if not path.suffix and not path.exists():
            raise DataError(
                f"{what} {path}: no such file or folder; give a data file ({', '.join(sorted(BUILDERS))}), "
                "a datasets folder, or hub:ORG/NAME for a Hub dataset in the local cache"
            )
        raise DataError(
            f"{what} {path}: unsupported file type; use one of {', '.join(sorted(BUILDERS))}, "
            "or a datasets folder"
        )
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
    return _read_table(path, builder, what)


def load_examples(
    source: str | Path, what: str = "data", columns: Mapping[str, str] | None = None
) -> list[Example]:
    """The examples of ``source`` (a file, ``FOLDER[:SPLIT]`` or ``hub:ORG/NAME[/CONFIG][:SPLIT]``).

    ``what`` names the source in error messages (e.g. ``"--forget"``); ``columns`` maps the roles
    ``question``, ``answer``, ``text`` to other column names.
    """
    parsed = parse_source(source, what)
    if parsed.kind == "file":
        table: dict[str, Any] = _read_file(Path(parsed.location), what)
    else:
        dataset = read_dataset(parsed, what)
        table = {name: dataset[name] for name in dataset.column_names}
    return examples_of_table(table, f"{what} {parsed.text}", columns)
