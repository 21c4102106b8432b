"""The histories file: users' event lists handed from the offline side to the service.

JSON lines, one user per line, events oldest first, each `[item_id, ts]` (ts: int unix
seconds, 0 for data without time):

    {"user_id": "1", "events": [["61", 874965739], ["189", 875072484]]}

`sidrec histories load --out FILE` writes it from a data set (offline/histories.py reads the
data), `sidrec serve --histories DIR` writes one aside for itself, and the service reads it at
start-up into its in-process store (SIDREC_HISTORIES, service/history_load.py). Like
bundle.py, it sits between the two sides so that neither imports the other; it needs no
pandas and no PyTorch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

SUFFIX = ".jsonl"

# (user_id, [(item_id, ts), ...] oldest first): what the service's store loads.
UserHistory = tuple[str, list[tuple[str, int]]]


class HistoriesFileError(ValueError):
    """A histories file is missing or malformed. The message names the file and line."""

    def __init__(self, path: object, problem: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


def is_histories_file(path: Path) -> bool:
    """Whether `path` names a histories file (by its suffix) rather than a data set."""
    return path.suffix == SUFFIX


def write_histories(path: Path, histories: Iterable[UserHistory]) -> tuple[int, int]:
    """Write users with at least one event; returns (users, events) written. The file
    appears whole or not at all (written aside, then renamed over `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    users = events = 0
    try:
        with scratch.open("wb") as f:
            for user_id, user_events in histories:
                if not user_events:
                    continue
                f.write(orjson.dumps({"user_id": user_id, "events": user_events}))
                f.write(b"\n")
                users += 1
                events += len(user_events)
        scratch.replace(path)
    finally:
        scratch.unlink(missing_ok=True)
    return users, events


def _history(path: Path, number: int, line: bytes) -> UserHistory:
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise HistoriesFileError(path, f"not JSON ({e})", number) from None
    if not isinstance(row, dict) or set(row) != {"user_id", "events"}:
        raise HistoriesFileError(
            path, 'expected {"user_id": "...", "events": [[item_id, ts], ...]}', number
        )
    user_id, raw = row["user_id"], row["events"]
    if not isinstance(user_id, str) or not user_id:
        raise HistoriesFileError(path, "user_id: expected a non-empty string", number)
    if not isinstance(raw, list):
        raise HistoriesFileError(path, "events: expected a list of [item_id, ts]", number)
    events: list[tuple[str, int]] = []
    for i, event in enumerate(raw):
        if (
            not isinstance(event, list)
            or len(event) != 2
            or not isinstance(event[0], str)
            or not event[0]
            or not isinstance(event[1], int)
            or isinstance(event[1], bool)
        ):
            raise HistoriesFileError(
                path, f"events[{i}]: expected [item_id (string), ts (int)], got {event!r}", number
            )
        events.append((event[0], event[1]))
    return user_id, events


def read_histories(path: Path) -> Iterator[UserHistory]:
    """The file's users in file order, read one line at a time. Raises HistoriesFileError
    (file and line) on a missing file, a folder or a malformed line; blank lines are skipped."""
    path = Path(path)
    if path.is_dir():
        raise HistoriesFileError(
            path,
            "a folder, not a histories file (JSON lines): write one from a data set with "
            "`sidrec histories load --data DIR --out FILE.jsonl`, or start the service with "
            "`sidrec serve --histories DIR`",
        )
    try:
        f = path.open("rb")
    except OSError as e:
        raise HistoriesFileError(path, e.strerror or str(e)) from None
    with f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield _history(path, number, line)


def check_histories(path: Path) -> tuple[int, int]:
    """Read the whole file once; (users, events) in it, or HistoriesFileError."""
    users = events = 0
    for _, user_events in read_histories(path):
        users += 1
        events += len(user_events)
    return users, events
