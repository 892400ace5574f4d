"""Reading a JSON Lines (or JSON array) file ourselves: literal path, every row checked, one-line errors.

``datasets``' JSON builder treats the file name as a glob pattern (``forget[1].jsonl`` read
``forget1.jsonl``; ``f*.jsonl`` merged every match) and its parser crashed the process (rc 139)
on a line of 20,000 nested lists. Here the path is opened as it is written, each line is parsed
by :mod:`json`, and a nesting deeper than `MAX_DEPTH` (or one that exhausts Python's recursion
limit) is refused with the file and line. Rows are returned as columns: the union of the rows'
keys in first-seen order, a key a row lacks read as ``None`` (as ``datasets`` fills it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_DEPTH = 64  # a row of string cells nests 1 deep; anything past this is not a data row


class JsonRowsError(ValueError):
    """A JSON file that cannot be read as rows; the message names the file, the line and the fix."""


def _depth(text: str) -> int:
    """The deepest bracket nesting in ``text``, outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _parse(text: str, where: str) -> Any:
    brackets = text.count("[") + text.count("{")  # counted in C: the scan runs only when it could matter
    if brackets > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise JsonRowsError(
            f"{where}: nested more than {MAX_DEPTH} levels deep; each row must be an object of "
            "'text' or 'question'/'answer' strings"
        )
    try:
        return json.loads(text)
    except RecursionError as err:  # the depth scan should have caught it; never crash on it
        raise JsonRowsError(f"{where}: nested too deeply to read") from err
    except json.JSONDecodeError as err:
        raise JsonRowsError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err


def read_json_rows(path: Path, what: str) -> dict[str, list[Any]]:
    """The rows of the JSON Lines (or JSON array) file ``path`` as ``{column: values}``.

    ``what`` names the file in errors (``"--forget"``). The file must be UTF-8 (checked before).
    """
    with path.open(encoding="utf-8") as handle:
        text = handle.read()
    rows: list[tuple[str, Any]]  # (where, row)
    if text.lstrip().startswith("["):  # one JSON array of objects (a .json file)
        document = _parse(text, f"{what} {path}")
        document = document if isinstance(document, list) else [document]
        rows = [(f"{what} {path}: row {n}", row) for n, row in enumerate(document, start=1)]
    else:
        rows = [
            (f"{what} {path}:{n}", _parse(line, f"{what} {path}:{n}"))
            for n, line in enumerate(text.split("\n"), start=1)  # not splitlines: U+2028 may sit in a string
            if line.strip()
        ]
    columns: dict[str, list[Any]] = {}
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise JsonRowsError(
                f"{where}: a JSON {type(row).__name__}, not an object; write one "
                'object per line, e.g. {"question": "...", "answer": "..."}'
            )
        for key in row:
            columns.setdefault(key, [None] * index)
        for key, values in columns.items():
            values.append(row.get(key))
    return columns
