"""Reading forget/retain sets from files through ``datasets``.

Accepted: ``.jsonl``/``.json``, ``.csv``, ``.parquet`` and ``.txt`` (one example per line). Each
row needs either a ``text`` column (labelled on every token) or ``question`` and ``answer``
columns (labelled on the answer only). Every problem is raised as `DataError` with a message
that names the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

from gradsynth.unlearning.encoding import Example, prompt_of

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class DataError(ValueError):
    """A data file that cannot be used, with the reason and the fix."""


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
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{what} {path}: could not be read as {builder} ({reason})") from err
    columns = set(table.column_names)
    if len(table) == 0:
        raise DataError(f"{what} {path}: the file has no rows; give at least one example")
    if {"question", "answer"} <= columns:
        return [
            Example(prompt_of(str(q)), str(a))
            for q, a in zip(table["question"], table["answer"], strict=True)
        ]
    if "text" in columns:
        texts = [str(t) for t in table["text"] if t is not None and str(t).strip()]
        if not texts:
            raise DataError(f"{what} {path}: every 'text' is empty; give at least one example")
        return [Example(t) for t in texts]
    raise DataError(
        f"{what} {path}: has columns {sorted(columns)}; it needs a 'text' column or "
        "'question' and 'answer' columns"
    )
