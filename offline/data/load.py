"""`load_dataset`: pick the reader from the files present in a directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .dataset import DataError, Interactions
from .generic import read_generic, read_recbole
from .movielens import TIE_ORDERS, read_ml1m, read_ml1m_sequences, read_ml100k, read_movielens_csv


@dataclass(frozen=True)
class Format:
    """A data set layout: the file whose presence identifies it, and its reader."""

    key: str
    marker: str  # file name, or a glob pattern
    needs: str  # what else the reader needs, for messages
    description: str
    reader: Callable[[Path, str | None], Interactions]


# Checked in this order: a directory with both ratings.dat and sequences.txt is read from the
# official ratings.dat (real timestamps).
FORMATS = (
    Format(
        "ml-100k",
        "u.data",
        "u.item",
        "MovieLens-100K",
        lambda d, n: read_ml100k(d, n or "ml-100k"),
    ),
    Format("recbole", "*.inter", "the matching .item", "RecBole atomic files", read_recbole),
    Format(
        "ml-1m",
        "ratings.dat",
        "movies.dat",
        "MovieLens-1M",
        lambda d, n: read_ml1m(d, n or "ml-1m"),
    ),
    Format(
        "ml-1m-sequences",
        "sequences.txt",
        "movies.dat, optional timestamps_partial.tsv",
        "MovieLens-1M as one line per user",
        lambda d, n: read_ml1m_sequences(d, n or "ml-1m"),
    ),
    Format(
        "movielens-csv",
        "ratings.csv",
        "movies.csv",
        "MovieLens-20M / 25M / ml-latest",
        read_movielens_csv,
    ),
    Format(
        "generic",
        "interactions.*",
        "items.csv|parquet",
        "generic, CSV or Parquet",
        read_generic,
    ),
)


def _present(directory: Path, marker: str) -> bool:
    if marker == "interactions.*":
        return any((directory / f"interactions{s}").is_file() for s in (".csv", ".parquet"))
    if "*" in marker:
        return any(p.is_file() for p in directory.glob(marker))
    return (directory / marker).is_file()


def detect_format(path: Path) -> Format:
    """The format of the data in directory `path`; DataError listing what was looked for."""
    directory = Path(path)
    if not directory.exists():
        raise DataError(directory, "no such file or directory")
    if directory.is_file():
        directory = directory.parent
    for candidate in FORMATS:
        if _present(directory, candidate.marker):
            return candidate
    looked_for = "; ".join(f"{f.marker} + {f.needs} ({f.description})" for f in FORMATS)
    # A zip extracted one level up (data/ml-1m/...) is the usual slip: name the folder.
    inside = sorted(
        str(sub)
        for sub in directory.iterdir()
        if sub.is_dir() and any(_present(sub, f.marker) for f in FORMATS)
    )
    hint = f" (data found in {', '.join(inside)}: give one of those folders)" if inside else ""
    raise DataError(directory, f"no known data set files here{hint}. Looked for: {looked_for}")


def load_dataset(path: Path, name: str | None = None, tie_order: str = "file") -> Interactions:
    """Reads the data set in directory `path` (a file inside it works too), whatever its
    format. `name` overrides the data set's name (default: the format's usual name, e.g.
    "ml-1m", else the directory's). `tie_order` orders a user's same-time events: "file"
    (stably, in file order: every format) or "gr" (GR's research preprocessing order, ML-1M's
    ratings.dat only; movielens.py)."""
    if tie_order not in TIE_ORDERS:
        raise DataError(
            "--tie-order", f"expected one of {', '.join(TIE_ORDERS)}, got {tie_order!r}"
        )
    directory = Path(path)
    fmt = detect_format(directory)
    if directory.is_file():
        directory = directory.parent
    if tie_order == "file":
        return fmt.reader(directory, name)
    if fmt.key == "ml-1m-sequences":
        raise DataError(
            directory / "sequences.txt",
            "tie order 'gr' needs ratings.dat: GR orders ML-1M by sorting every rating of "
            "ratings.dat by timestamp (an unstable sort that reshuffles same-second ratings), "
            "and sequences.txt holds one fixed order per user with most timestamps missing, "
            "so that order cannot be derived from it. Add ratings.dat to the folder or use "
            "--tie-order file",
        )
    if fmt.key != "ml-1m":
        raise DataError(
            directory,
            f"tie order 'gr' is defined for MovieLens-1M's ratings.dat only, not for "
            f"{fmt.description} data; use --tie-order file",
        )
    return read_ml1m(directory, name or "ml-1m", tie_order=tie_order)
