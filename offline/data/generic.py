"""Generic interaction files, RecBole atomic files, and the table reading shared with MovieLens.

Generic format (a directory):
- `interactions.csv` or `interactions.parquet`: columns `user_id`, `item_id`, and optionally
  `timestamp` (integer unix seconds) and/or `order` (any number; sorts a user's events).
  A `timestamp` column that holds positions (every user's values consecutive integers, all
  below 1,000,000: `looks_like_positions`) is used as `order`, with a note.
  Other columns (rating, ...) are ignored. Every row is one event.
- `items.csv` or `items.parquet`: column `item_id`, optionally `title` and `genres` (`|` or `,`
  separated); every other column becomes a text field of the item.

Decisions:
- An item that appears in interactions but not in the items file is added to the catalog with
  empty text (and counted in `notes`): product catalogs often drop items that still have
  history. The MovieLens and RecBole readers treat it as an error instead.
- With `timestamp`, events sort by (timestamp, order if given, file position); with only
  `order`, by (order, file position) and `timestamps` is None; with neither, file order.
- Catalog order: by numeric id when every item id is a decimal integer, else items-file order
  followed by the added items in order of first appearance.

Big files are read with pandas' C parser; only when it reports a problem (or a column comes
back with the wrong type) is the file scanned line by line to name the first bad line.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .dataset import Catalog, DataError, Interactions, group_by_user, id_order

SEPARATOR_NAMES = {"\t": "tabs", ",": "','", "::": "'::'", "|": "'|'", " ": "spaces"}


@dataclass(frozen=True)
class Field:
    """One column of a delimited text file, named as the file's documentation names it."""

    name: str
    kind: Literal["int", "number", "text"] = "int"


def require_file(path: Path, what: str) -> Path:
    """`path` if it is a file, else DataError saying what the file should have held."""
    if not path.is_file():
        raise DataError(path, f"file not found (expected {what})")
    return path


def _problem_with_value(field: Field, value: str) -> str | None:
    """Why `value` is not a valid `field`, or None."""
    if field.kind == "int":
        try:
            int(value)
        except ValueError:
            return f"expected {field.name} to be an integer, got {value!r}"
    elif field.kind == "number":
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            return f"expected {field.name} to be a number, got {value!r}"
    return None


def is_blank(text: str, sep: str) -> bool:
    """Whether pandas' C parser skips this line: empty or spaces only (tabs count when they
    do not separate fields)."""
    return (text.strip(" ") if sep == "\t" else text.strip()) == ""


def text_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text without line end), decoded line by line so a bad byte is reported
    at its line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(path, f"not valid {encoding} text ({exc.reason})", number) from None
            yield number, text.rstrip("\r\n")


def _raise_if_undecodable(path: Path, encoding: str) -> None:
    """DataError at the first line that is not valid `encoding` (csv's text mode reads ahead,
    so its own line count is wrong at a decoding error)."""
    for _ in text_lines(path, encoding):
        pass


def layout(sep: str, fields: Sequence[Field]) -> str:
    """'UserID::MovieID::Rating::Timestamp' style description of a line."""
    joiner = ", " if sep in ("\t", " ") else sep
    return joiner.join(f.name for f in fields)


def expected_fields(sep: str, fields: Sequence[Field]) -> str:
    return (
        f"expected {len(fields)} fields separated by {SEPARATOR_NAMES.get(sep, repr(sep))} "
        f"({layout(sep, fields)})"
    )


def scan_plain(
    path: Path,
    sep: str,
    fields: Sequence[Field],
    *,
    skip: int,
    encoding: str,
) -> None:
    """Validates every line of a delimited file and raises DataError at the first bad one.

    The slow, precise twin of `read_plain_table`'s pandas path: called only when that path
    has seen a problem, to say where it is.
    """
    for number, text in text_lines(path, encoding):
        if number <= skip or is_blank(text, sep):
            continue
        parts = text.split(sep)
        if len(parts) != len(fields):
            raise DataError(path, f"{expected_fields(sep, fields)}, got {len(parts)}", number)
        for field, value in zip(fields, parts, strict=True):
            problem = _problem_with_value(field, value.strip())
            if problem is not None:
                raise DataError(path, problem, number)


def record_line(path: Path, index: int, *, sep: str, skip: int, encoding: str) -> int:
    """File line number of the `index`-th (0-based) data line, blank lines not counted."""
    seen = -1
    for number, text in text_lines(path, encoding):
        if number <= skip or is_blank(text, sep):
            continue
        seen += 1
        if seen == index:
            return number
    raise ValueError(f"{path} has no data line {index}")


def first_line(path: Path, encoding: str) -> str:
    with path.open("rb") as f:
        raw = f.readline()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid {encoding} text ({exc.reason})", 1) from None
    return text.lstrip("\ufeff").rstrip("\r\n")


def read_plain_table(
    path: Path,
    sep: str,
    fields: Sequence[Field],
    *,
    header: str | None = None,
    encoding: str = "utf-8",
    what: str = "",
) -> list[np.ndarray]:
    """Columns of a delimited text file (no quoting) with exactly len(fields) fields a line.

    int fields come back int64, number fields float64, text fields object arrays of str.
    `header`, when given, must be the file's first line exactly. Blank lines are skipped.
    Raises DataError naming the file, line and expectation for any malformed line.
    """
    require_file(path, what or layout(sep, fields))
    skip = 0
    if header is not None:
        got = first_line(path, encoding)
        if got != header:
            raise DataError(path, f"expected the header line {header!r}, got {got!r}", 1)
        skip = 1
    # The C parser takes one-character separators only; '::' becomes a byte no file holds.
    source: Path | io.BytesIO = path
    parser_sep = sep
    if len(sep) > 1:
        source, parser_sep = io.BytesIO(path.read_bytes().replace(sep.encode(), b"\x1f")), "\x1f"
    columns: list[np.ndarray] | None = None
    try:
        with warnings.catch_warnings():
            # Extra fields on the first line only warn (and get cut off): make that an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                source,
                sep=parser_sep,
                header=None,
                names=[f.name for f in fields],
                skiprows=skip,
                index_col=False,
                quoting=csv.QUOTE_NONE,
                encoding=encoding,
                dtype={f.name: str for f in fields if f.kind == "text"},
                keep_default_na=False,
                na_values={f.name: [""] for f in fields if f.kind != "text"},
                engine="c",
            )
        columns = _typed_columns(frame, fields) if len(frame) else [np.empty(0)]
    except pd.errors.EmptyDataError:
        columns = [np.empty(0)]
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError, UnicodeDecodeError):
        columns = None
    if columns is None:
        scan_plain(path, sep, fields, skip=skip, encoding=encoding)
        raise DataError(path, f"could not be parsed; {expected_fields(sep, fields)} on every line")
    if len(columns[0]) == 0:
        raise DataError(path, f"no data lines; {expected_fields(sep, fields)}")
    return columns


def _typed_columns(frame: pd.DataFrame, fields: Sequence[Field]) -> list[np.ndarray] | None:
    """The frame's columns as numpy arrays, or None if any has the wrong type or a gap
    (a short line leaves NaN; a non-number turns the column to strings)."""
    columns = []
    for field in fields:
        column = frame[field.name]
        kind = column.dtype.kind
        if field.kind == "int":
            if kind not in "iu":
                return None
            columns.append(column.to_numpy(dtype=np.int64))
        elif field.kind == "number":
            if kind not in "iuf" or column.isna().any():
                return None
            values = column.to_numpy(dtype=np.float64)
            if not np.isfinite(values).all():
                return None
            columns.append(values)
        else:
            if column.isna().any():
                return None
            columns.append(column.to_numpy(dtype=object))
    return columns


def rows_of_int_ids(ids: np.ndarray, catalog_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Catalog rows (1-based) of integer ids against the sorted int64 `catalog_ids`.

    Returns (rows[E] int64 with 0 where unknown, known[E] bool).
    """
    if len(catalog_ids) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    low, high = int(catalog_ids[0]), int(catalog_ids[-1])
    if low >= 0 and high <= 4 * len(ids) + 1_000_000:
        # A dense id -> row table: one gather, ~5x faster than searchsorted on 20M ids.
        table = np.zeros(high + 2, dtype=np.int64)  # the last slot catches out-of-range ids
        table[catalog_ids] = np.arange(1, len(catalog_ids) + 1)
        rows = table[np.where((ids >= 0) & (ids <= high), ids, high + 1)]
        return rows, rows > 0
    where = np.minimum(np.searchsorted(catalog_ids, ids), len(catalog_ids) - 1)
    known = catalog_ids[where] == ids
    return np.where(known, where + 1, 0).astype(np.int64), known


def users_of(raw_users: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Dense user codes[E] and the user ids in order (numeric when every id is an integer,
    else first appearance)."""
    codes, unique = pd.factorize(raw_users)  # hashing: faster than np.unique's sort
    if np.asarray(unique).dtype.kind in "iu":
        order = np.argsort(np.asarray(unique), kind="stable")
        ids = [str(u) for u in np.asarray(unique)[order].tolist()]
    else:
        unsorted = [str(u) for u in unique]
        order = np.array(id_order(unsorted), dtype=np.int64)
        ids = [unsorted[k] for k in order]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes], ids


def make_interactions(
    name: str,
    catalog: Catalog,
    raw_users: np.ndarray,
    rows: np.ndarray,
    timestamps: np.ndarray | None,
    *,
    order: np.ndarray | None = None,
    time_source: str = "observed",
    notes: list[str] | None = None,
) -> Interactions:
    """Groups events (one per array element, in file order) into per-user sequences sorted
    stably by (timestamp, order, file position)."""
    codes, users = users_of(raw_users)
    keys = [k for k in (timestamps, order) if k is not None]
    columns: list[np.ndarray] = [rows.astype(np.int64)]
    if timestamps is not None:
        columns.append(timestamps.astype(np.int64))
    grouped = group_by_user(codes, len(users), columns, keys)
    return Interactions(
        name=name,
        catalog=catalog,
        users=users,
        sequences=grouped[0],
        timestamps=grouped[1] if timestamps is not None else None,
        time_source=time_source if timestamps is not None else "none",
        notes=notes or [],
    )


# --- generic CSV / Parquet -------------------------------------------------------------------

INTERACTION_COLUMNS = "user_id, item_id and optionally timestamp and/or order"


def _find(directory: Path, stem: str) -> Path | None:
    for suffix in (".csv", ".parquet"):
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    return None


def read_generic(directory: Path, name: str | None = None) -> Interactions:
    """Reads `interactions.{csv,parquet}` + `items.{csv,parquet}` from `directory`."""
    directory = Path(directory)
    events_path = _find(directory, "interactions")
    items_path = _find(directory, "items")
    if events_path is None:
        raise DataError(directory / "interactions.csv", "file not found (nor interactions.parquet)")
    if items_path is None:
        raise DataError(directory / "items.csv", "file not found (nor items.parquet)")
    item_ids, titles, fields, genres = _read_items(items_path)
    events = _read_events(events_path)

    known = {item_id: k for k, item_id in enumerate(item_ids)}
    # Items with history but no description: appended with empty text (see module docstring).
    codes, unique = pd.factorize(events["item_id"])
    unique_ids = [str(i) for i in unique]
    extra = [i for i in unique_ids if i not in known]
    notes = []
    if extra:
        shown = ", ".join(repr(i) for i in extra[:5])
        notes.append(
            f"{len(extra)} item ids in {events_path.name} are not in {items_path.name}; "
            f"added with empty text (e.g. {shown})"
        )
        for item_id in extra:
            known[item_id] = len(item_ids)
            item_ids.append(item_id)
            titles.append("")
            fields.append({})
            genres.append(())
    order = id_order(item_ids)
    catalog = Catalog(
        ids=[item_ids[k] for k in order],
        titles=[titles[k] for k in order],
        fields=[fields[k] for k in order],
        genres=[genres[k] for k in order],
    )
    row_of_file_index = np.empty(len(order), dtype=np.int64)
    row_of_file_index[order] = np.arange(1, len(order) + 1)
    unique_rows = np.array([row_of_file_index[known[i]] for i in unique_ids], dtype=np.int64)
    rows = unique_rows[codes]
    timestamps = events.get("timestamp")
    order = events.get("order")
    if timestamps is not None and looks_like_positions(events["user_id"], timestamps):
        # Positions taken for unix seconds would put every event in January 1970, one second
        # apart: the time features would be noise. They still order the events.
        notes.append(
            f"{events_path.name}: column 'timestamp' holds positions, not unix seconds "
            f"(every user's values are consecutive integers, all below {POSITION_LIMIT:,}); "
            "used as order (as if the column were named 'order'), no time features"
        )
        # Distinct per user, so an `order` column could only break ties that do not exist.
        timestamps, order = None, timestamps.astype(np.float64)
    return make_interactions(
        name or directory.resolve().name,
        catalog,
        events["user_id"],
        rows,
        timestamps,
        order=order,
        notes=notes,
    )


# Unix second 1,000,000 is 1970-01-12: no real event log starts there, while positions of
# histories up to a million events stay below it.
POSITION_LIMIT = 1_000_000


def looks_like_positions(raw_users: np.ndarray, timestamps: np.ndarray) -> bool:
    """Whether a timestamp column is really event positions: every user's values, sorted,
    are consecutive integers (0, 1, 2, ... or 1, 2, 3, ..., each one step from the last) and
    every value is below POSITION_LIMIT."""
    if len(timestamps) == 0 or timestamps.min() < 0 or timestamps.max() >= POSITION_LIMIT:
        return False
    codes, _ = pd.factorize(raw_users)
    by_user = np.lexsort((timestamps, codes))
    users, values = codes[by_user], timestamps[by_user]
    same_user = users[1:] == users[:-1]
    return bool((np.diff(values)[same_user] == 1).all())


def _read_events(path: Path) -> dict[str, np.ndarray]:
    """user_id, item_id (str, or int64 from Parquet), timestamp (int64), order (float64)."""
    if path.suffix == ".parquet":
        return _read_events_parquet(path)
    require_file(path, f"a CSV file with a header naming {INTERACTION_COLUMNS}")
    header = _csv_header(path)
    if "user_id" not in header or "item_id" not in header:
        raise DataError(
            path, f"expected a header with columns {INTERACTION_COLUMNS}, got {header}", 1
        )
    wanted = [c for c in ("user_id", "item_id", "timestamp", "order") if c in header]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                header=0,
                names=header,
                index_col=False,
                dtype={"user_id": str, "item_id": str},
                keep_default_na=False,
                na_values={"timestamp": [""], "order": [""]},
                encoding="utf-8-sig",
                engine="c",
            )
        events = _checked_events(frame, wanted)
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError, UnicodeDecodeError):
        events = None
    if events is None:
        _scan_events_csv(path, header)
        raise DataError(path, f"could not be parsed as CSV with columns {INTERACTION_COLUMNS}")
    if len(events["user_id"]) == 0:
        raise DataError(path, "no data lines after the header")
    return events


def _checked_events(frame: pd.DataFrame, wanted: list[str]) -> dict[str, np.ndarray] | None:
    """numpy columns, or None when a value is missing or has the wrong type."""
    events: dict[str, np.ndarray] = {}
    for column in ("user_id", "item_id"):
        values = frame[column]
        values = values.str.strip()
        if values.isna().any() or (values == "").any():
            return None
        events[column] = values.to_numpy(dtype=object)
    if "timestamp" in wanted:
        values = frame["timestamp"]
        if values.dtype.kind not in "iu":
            return None
        events["timestamp"] = values.to_numpy(dtype=np.int64)
    if "order" in wanted:
        values = frame["order"]
        if values.dtype.kind not in "iuf" or values.isna().any():
            return None
        events["order"] = values.to_numpy(dtype=np.float64)
    return events


def _csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            header = next(csv.reader(f), [])
        except UnicodeDecodeError:
            _raise_if_undecodable(path, "utf-8-sig")
            raise
    if not header:
        raise DataError(path, f"the file is empty; expected a header naming {INTERACTION_COLUMNS}")
    return [h.strip() for h in header]


def _scan_events_csv(path: Path, header: list[str]) -> None:
    """Raises DataError at the first bad line of an interactions CSV (the precise twin of the
    pandas path)."""
    checks = {
        "user_id": Field("user_id", "text"),
        "item_id": Field("item_id", "text"),
        "timestamp": Field("timestamp (integer unix seconds)", "int"),
        "order": Field("order", "number"),
    }
    positions = {c: header.index(c) for c in checks if c in header}
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        try:
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if len(record) != len(header):
                    raise DataError(
                        path,
                        f"expected {len(header)} comma-separated fields ({','.join(header)}), "
                        f"got {len(record)}",
                        reader.line_num,
                    )
                for column, position in positions.items():
                    value = record[position].strip()
                    field = checks[column]
                    problem = (
                        f"{column} is empty" if not value else _problem_with_value(field, value)
                    )
                    if problem is not None:
                        raise DataError(path, problem, reader.line_num)
        except UnicodeDecodeError:
            _raise_if_undecodable(path, "utf-8-sig")
            raise
        except csv.Error as exc:
            raise DataError(path, f"malformed CSV ({exc})", reader.line_num) from None


def _read_events_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(path, f"not a readable Parquet file ({exc})") from None
    if "user_id" not in names or "item_id" not in names:
        raise DataError(path, f"expected columns {INTERACTION_COLUMNS}, got {names}")
    wanted = [c for c in ("user_id", "item_id", "timestamp", "order") if c in names]
    frame = pd.read_parquet(path, columns=wanted)
    if len(frame) == 0:
        raise DataError(path, "no rows")
    events: dict[str, np.ndarray] = {}
    for column in ("user_id", "item_id"):
        values = frame[column]
        missing = values.isna().to_numpy()
        if missing.any():
            raise DataError(path, f"row {int(np.argmax(missing)) + 1}: {column} is missing")
        # Integer ids stay integers (str() of 20M ints is slow); they become strings per unique.
        if values.dtype.kind in "iu":
            events[column] = values.to_numpy(dtype=np.int64)
        else:
            events[column] = values.astype(str).str.strip().to_numpy(dtype=object)
    if "timestamp" in wanted:
        events["timestamp"] = _parquet_seconds(path, frame["timestamp"])
    if "order" in wanted:
        values = frame["order"]
        if values.dtype.kind not in "iuf" or values.isna().any():
            bad = int(np.argmax(pd.to_numeric(values, errors="coerce").isna().to_numpy()))
            raise DataError(
                path, f"row {bad + 1}: expected order to be a number, got {values.iloc[bad]!r}"
            )
        events["order"] = values.to_numpy(dtype=np.float64)
    return events


def _parquet_seconds(path: Path, values: pd.Series) -> np.ndarray:
    """int64 unix seconds from an integer or datetime column."""
    if values.dtype.kind == "M":
        missing = values.isna().to_numpy()
        if missing.any():
            raise DataError(path, f"row {int(np.argmax(missing)) + 1}: timestamp is missing")
        if values.dt.tz is not None:
            values = values.dt.tz_convert("UTC").dt.tz_localize(None)
        return values.to_numpy(dtype="datetime64[s]").astype(np.int64)
    if values.dtype.kind in "iu":
        return values.to_numpy(dtype=np.int64)
    if values.dtype.kind == "f":
        seconds = values.to_numpy(dtype=np.float64)
        whole = np.isfinite(seconds) & (seconds == np.floor(seconds))
        if whole.all():
            return seconds.astype(np.int64)
        bad = ~whole
        first = int(np.argmax(bad))
        raise DataError(
            path,
            f"row {first + 1}: expected timestamp to be whole unix seconds, got {seconds[first]}",
        )
    bad = values.isna().to_numpy()
    if not bad.any():
        bad = np.ones(len(values), dtype=bool)
    first = int(np.argmax(bad))
    raise DataError(
        path,
        f"row {first + 1}: expected timestamp to be integer unix seconds or a datetime, "
        f"got {values.iloc[first]!r} (column type {values.dtype})",
    )


def split_genres(text: str) -> tuple[str, ...]:
    """'Action|Comedy' or 'Action, Comedy' -> ('Action', 'Comedy')."""
    sep = "|" if "|" in text else ","
    return tuple(g.strip() for g in text.split(sep) if g.strip())


def _read_items(
    path: Path,
) -> tuple[list[str], list[str], list[dict[str, str]], list[tuple[str, ...]]]:
    """(ids, titles, fields, genres) in file order from an items CSV or Parquet file."""
    records: list[tuple[int | None, dict[str, str]]] = []  # (line or None, values)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            frame = pq.read_table(path).to_pandas()
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise DataError(path, f"not a readable Parquet file ({exc})") from None
        columns = [str(c) for c in frame.columns]
        for values in frame.itertuples(index=False, name=None):
            records.append(
                (
                    None,
                    {c: _cell_text(v) for c, v in zip(columns, values, strict=True)},
                )
            )
    else:
        require_file(path, "a CSV file with a header naming item_id and text columns")
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                columns = [c.strip() for c in next(reader, [])]
                if not columns:
                    raise DataError(
                        path, "the file is empty; expected a header naming item_id, title, ..."
                    )
                for record in reader:
                    if not record or (len(record) == 1 and not record[0].strip()):
                        continue
                    if len(record) != len(columns):
                        raise DataError(
                            path,
                            f"expected {len(columns)} comma-separated fields "
                            f"({','.join(columns)}), got {len(record)}",
                            reader.line_num,
                        )
                    records.append(
                        (
                            reader.line_num,
                            {c: v.strip() for c, v in zip(columns, record, strict=True)},
                        )
                    )
            except UnicodeDecodeError:
                _raise_if_undecodable(path, "utf-8-sig")
                raise
            except csv.Error as exc:
                raise DataError(path, f"malformed CSV ({exc})", reader.line_num) from None
    if "item_id" not in columns:
        raise DataError(
            path,
            f"expected an item_id column, got {columns}",
            None if path.suffix == ".parquet" else 1,
        )
    if not records:
        raise DataError(path, "no items")
    ids: list[str] = []
    titles: list[str] = []
    fields: list[dict[str, str]] = []
    genres: list[tuple[str, ...]] = []
    first_seen: dict[str, int] = {}
    for number, (line, values) in enumerate(records, start=1):
        where = f"row {number}: " if line is None else ""
        item_id = values.pop("item_id")
        if not item_id:
            raise DataError(path, f"{where}item_id is empty", line)
        if item_id in first_seen:
            first = (
                f"line {first_seen[item_id]}" if line is not None else f"row {first_seen[item_id]}"
            )
            raise DataError(
                path, f"{where}item_id {item_id!r} appears again (first at {first})", line
            )
        first_seen[item_id] = line if line is not None else number
        item_genres = split_genres(values.pop("genres", ""))
        ids.append(item_id)
        titles.append(values.pop("title", ""))
        text = {k: v for k, v in values.items() if v}
        if item_genres:
            text["genres"] = ", ".join(item_genres)
        fields.append(text)
        genres.append(item_genres)
    return ids, titles, fields, genres


def _cell_text(value: object) -> str:
    """A Parquet cell as text: lists (e.g. genres) joined with '|', missing values empty."""
    if isinstance(value, list | tuple | np.ndarray):
        return "|".join(str(v).strip() for v in value)
    if value is None or pd.isna(value):
        return ""
    return str(value).strip()


# --- RecBole atomic files --------------------------------------------------------------------

RECBOLE_TITLE = ("movie_title", "title", "name")
RECBOLE_YEAR = ("release_year", "year")
RECBOLE_GENRES = ("class", "genre", "genres", "categories")


def _recbole_header(path: Path) -> list[tuple[str, str]]:
    """[(name, type)] of a RecBole atomic file's typed header (`user_id:token\\t...`)."""
    text = first_line(path, "utf-8")
    columns = []
    for cell in text.split("\t"):
        name, _, kind = cell.strip().partition(":")
        if not kind:
            raise DataError(
                path,
                f"expected a RecBole header of tab-separated name:type cells "
                f"(e.g. 'user_id:token'), got {cell!r}",
                1,
            )
        columns.append((name, kind))
    return columns


def read_recbole(directory: Path, name: str | None = None) -> Interactions:
    """Reads RecBole atomic files `<stem>.inter` + `<stem>.item` (e.g. ml-100k from the recbole
    wheel); the data set is named `name`, default the stem.

    Token ids stay strings; a `timestamp:float` is floored to whole seconds; a token_seq genre
    column (`class` in ml-100k) is split on spaces. An item in .inter but not in .item is an
    error (as for MovieLens)."""
    directory = Path(directory)
    inter_files = sorted(directory.glob("*.inter"))
    matching = [p for p in inter_files if p.stem == directory.resolve().name]
    if len(inter_files) == 1 or len(matching) == 1:
        inter_path = inter_files[0] if len(inter_files) == 1 else matching[0]
    else:
        raise DataError(
            directory,
            f"expected one *.inter file (or one named after the directory), "
            f"found {[p.name for p in inter_files]}",
        )
    stem = inter_path.stem
    item_path = require_file(directory / f"{stem}.item", f"RecBole item file for {inter_path.name}")
    catalog = _read_recbole_items(item_path)

    header = _recbole_header(inter_path)
    names = [n for n, _ in header]
    for needed in ("user_id", "item_id"):
        if needed not in names:
            raise DataError(
                inter_path, f"expected a {needed}:token column in the header, got {names}", 1
            )
    fields = [
        Field(f"{n}:{k}", "number" if n == "timestamp" or k == "float" else "text")
        for n, k in header
    ]
    # Token columns are text; RecBole writes no quotes, so the plain reader fits.
    values = read_plain_table(inter_path, "\t", fields, header=first_line(inter_path, "utf-8"))
    columns = dict(zip(names, values, strict=True))
    for needed in ("user_id", "item_id"):
        stripped = pd.Series(columns[needed]).str.strip()
        empty = (stripped == "").to_numpy()
        if empty.any():
            line = record_line(
                inter_path, int(np.argmax(empty)), sep="\t", skip=1, encoding="utf-8"
            )
            raise DataError(inter_path, f"{needed} is empty", line)
        columns[needed] = stripped.to_numpy(dtype=object)
    ids_known = {item_id: row for row, item_id in enumerate(catalog.ids, start=1)}
    item_codes, unique_items = pd.factorize(columns["item_id"])
    unique_rows = np.array([ids_known.get(i, 0) for i in unique_items], dtype=np.int64)
    rows = unique_rows[item_codes]
    if (rows == 0).any():
        first = int(np.argmax(rows == 0))
        line = record_line(inter_path, first, sep="\t", skip=1, encoding="utf-8")
        raise DataError(
            inter_path, f"item_id {columns['item_id'][first]!r} is not in {item_path.name}", line
        )
    timestamps = None
    if "timestamp" in columns:
        timestamps = np.floor(columns["timestamp"]).astype(np.int64)
    return make_interactions(name or stem, catalog, columns["user_id"], rows, timestamps)


def _read_recbole_items(path: Path) -> Catalog:
    header = _recbole_header(path)
    names = [n for n, _ in header]
    if "item_id" not in names:
        raise DataError(path, f"expected an item_id:token column in the header, got {names}", 1)
    title_column = next((c for c in RECBOLE_TITLE if c in names), None)
    year_column = next((c for c in RECBOLE_YEAR if c in names), None)
    genre_column = next((c for c in RECBOLE_GENRES if c in names), None)
    ids: list[str] = []
    titles: list[str] = []
    fields: list[dict[str, str]] = []
    genres: list[tuple[str, ...]] = []
    seen: dict[str, int] = {}
    for number, text in text_lines(path, "utf-8"):
        if number == 1 or is_blank(text, "\t"):
            continue
        parts = text.split("\t")
        if len(parts) != len(names):
            raise DataError(
                path,
                f"expected {len(names)} fields separated by tabs ({', '.join(names)}), "
                f"got {len(parts)}",
                number,
            )
        values = dict(zip(names, (p.strip() for p in parts), strict=True))
        item_id = values.pop("item_id")
        if not item_id:
            raise DataError(path, "item_id is empty", number)
        if item_id in seen:
            raise DataError(
                path, f"item_id {item_id!r} appears again (first at line {seen[item_id]})", number
            )
        seen[item_id] = number
        title = values.pop(title_column, "") if title_column else ""
        year = values.pop(year_column, "") if year_column else ""
        item_genres = tuple(values.pop(genre_column, "").split()) if genre_column else ()
        text_fields = {k: v for k, v in values.items() if v}
        if year.isdecimal():  # ml-100k writes 'unkonwn' for its one unknown movie
            text_fields["year"] = year
        if item_genres:
            text_fields["genres"] = ", ".join(item_genres)
        ids.append(item_id)
        titles.append(title)
        fields.append(text_fields)
        genres.append(item_genres)
    if not ids:
        raise DataError(path, "no items after the header")
    order = id_order(ids)
    return Catalog(
        ids=[ids[k] for k in order],
        titles=[titles[k] for k in order],
        fields=[fields[k] for k in order],
        genres=[genres[k] for k in order],
    )
