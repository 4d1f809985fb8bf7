"""Rows of the released TOFU and MUSE files, from a local folder or from the Hugging Face hub.

A split is found under a folder as the first of ``NAME.json``, ``NAME.jsonl``, ``NAME.parquet``,
``NAME-*.parquet`` and ``NAME/**/*.parquet`` (the hub's own layout and its parquet export):

* ``.json``: a JSON list of values, or JSON lines (TOFU's released ``forget10.json`` & co. are
  JSON lines with a ``.json`` name);
* ``.jsonl``: one JSON value per line (blank lines skipped);
* ``.parquet``: through ``pyarrow`` (or ``pandas``) when installed.

``"hub:NAME"`` as a source reads ``datasets.load_dataset(NAME, config, split=split)`` instead:
the optional ``datasets`` package is imported only then, and the data set must be reachable
(network or cache). A row's location in an error is ``file:line``, ``file: element [i]``,
``file: row [i]`` or ``hub:NAME[config]/split: row [i]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jax_unlearn.data import DataError

HUB_PREFIX = "hub:"
SUFFIXES = (".json", ".jsonl", ".parquet")


def is_hub(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def kind(value: Any) -> str:
    """``"an object"``, ``"a list"``, ... for an error message."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def find_split(root: str | os.PathLike, name: str, *alternatives: str) -> list[Path]:
    """The file(s) of split ``name`` (or of the first of ``alternatives`` found) under ``root``:
    one file, or the shards of a parquet split in order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    tried = []
    for n in (name, *alternatives):
        for suffix in SUFFIXES:
            p = root / f"{n}{suffix}"
            tried.append(p.name)
            if p.is_file():
                return [p]
        found = sorted(root.glob(f"{n}-*.parquet")) or sorted((root / n).glob("**/*.parquet"))
        tried += [f"{n}-*.parquet", f"{n}/**/*.parquet"]
        if found:
            return found
    raise DataError(f"{root}: no file for the split {name!r} (looked for {', '.join(tried)})")


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 - optional
        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd  # noqa: PLC0415 - optional
    except ImportError as err:
        raise DataError(f"{path}: reading parquet needs 'pyarrow' or 'pandas' (not installed); "
                        "use the .json/.jsonl files instead") from err
    return pd.read_parquet(path).to_dict("records")


def rows(source: str | os.PathLike | list) -> Iterator[tuple[str, Any]]:
    """``(location, value)`` for every row of a local file, or of several (parquet shards) in order
    (see the module docstring)."""
    if isinstance(source, list):
        for f in source:
            yield from rows(f)
        return
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix or '(no extension)'!r}; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if suffix == ".parquet":
        for i, row in enumerate(_read_parquet(path)):
            yield f"{path}: row [{i}]", row
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if not text.strip():
        return  # no rows (the caller names the empty split)
    if suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # not several values: a broken JSON document
                raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            value = None  # JSON lines under a .json name (TOFU's release)
        if not isinstance(value, list) and len([line for line in text.splitlines() if line.strip()]) == 1:
            value = None  # one JSON line: a JSON-lines file of one row
        if value is not None:
            if not isinstance(value, list):
                raise DataError(f"{path}: expected a JSON list of rows or one JSON object per line, got {kind(value)}")
            for i, item in enumerate(value):
                yield f"{path}: element [{i}]", item
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: expected one JSON value per line, got invalid JSON "
                            f"({err.msg} at column {err.colno})") from None
        yield f"{path}:{lineno}", value


def hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` of ``datasets.load_dataset(name, config, split=split)`` (optional package)."""
    try:
        import datasets  # noqa: PLC0415 - optional extra, imported only for the hub
    except ImportError as err:
        raise ImportError(f"reading {HUB_PREFIX}{name} needs the optional 'datasets' package "
                          "(pip install 'jax-unlearn[datasets]'); local folders do not") from err
    where = f"{HUB_PREFIX}{name}" + (f"[{config}]" if config else "") + f"/{split}"
    for i, row in enumerate(datasets.load_dataset(name, config, split=split)):
        yield f"{where}: row [{i}]", row


def field(loc: str, row: Any, key: str, expected: str, problem: str | None = None) -> DataError:
    """The `DataError` ``"{loc}: expected {expected} ({problem})"`` for ``row[key]``."""
    if problem is None:
        if not isinstance(row, Mapping):
            problem = f"got {kind(row)}"
        elif key not in row:
            problem = f"field {key!r} is missing"
        else:
            problem = f"field {key!r} is {kind(row[key])}"
    return DataError(f"{loc}: expected {expected} ({problem})")


def string(loc: str, row: Any, key: str, expected: str, *, nonempty: bool = False) -> str:
    """``row[key]`` as a string (non-empty when asked), else `field`'s error."""
    value = row.get(key) if isinstance(row, Mapping) else None
    if not isinstance(value, str):
        raise field(loc, row, key, expected)
    if nonempty and not value.strip():
        raise field(loc, row, key, expected, f"{key!r} is empty")
    return value


def strings(loc: str, row: Any, key: str, expected: str) -> tuple[str, ...]:
    """``row[key]`` as a non-empty list of strings, else `field`'s error naming the bad element."""
    value = row.get(key) if isinstance(row, Mapping) else None
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise field(loc, row, key, expected)
    if not value:
        raise field(loc, row, key, expected, f"{key!r} is an empty list")
    for j, v in enumerate(value):
        if not isinstance(v, str):
            raise field(loc, row, key, expected, f"{key}[{j}] is {kind(v)}")
    return tuple(value)


def nonempty(items: list, where: str) -> list:
    if not items:
        raise DataError(f"{where} holds no rows")
    return items
