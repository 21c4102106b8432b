"""MovieLens readers, each returning `Interactions` over the full movie catalog.

- `read_ml100k`: ML-100K official files, `u.data` (user, item, rating, timestamp; tabs) and
  `u.item` (`|`-separated, latin-1, 19 genre flags).
- `read_ml1m`: ML-1M official files, `ratings.dat` (UserID::MovieID::Rating::Timestamp) and
  `movies.dat` (MovieID::Title::Genres, latin-1); `users.dat` is not needed.
- `read_ml1m_sequences`: ML-1M as `sequences.txt` (one line per user, `UserID MovieID ...` in
  chronological order) + `movies.dat`, with optional `timestamps_partial.tsv`.
- `read_movielens_csv`: ML-20M / ML-25M / ml-latest `ratings.csv` + `movies.csv`.

Both ML-1M readers add `movies_extrainfos.dat` (year, rated, released, genres, director,
writers, actors, plot) to the item text when the file is there.

Decisions:
- Every rating is one interaction; rating values are checked, then not used.
- The catalog is every movie of the movie file, rated or not (ML-1M: 3,883, of which 3,706
  rated), sorted by movie id. A rating of a movie missing from the movie file is a DataError.
- Titles lose their trailing "(1995)"; the year goes to fields["year"] (ML-100K falls back to
  the release date). Catalog.genres holds MovieLens' genres; fields["genres"] holds the
  extrainfos (IMDb) genres when present, else MovieLens' joined with ", ".
- A user's events sort stably by (timestamp, line in the file); sequences.txt's order is kept
  as is. `read_ml1m(tie_order="gr")` orders same-second events as GR's research preprocessing
  (generative-recommenders, research/data/preprocessor.py) does instead: it reads ratings.dat
  into pandas (four int64 columns), sorts the WHOLE frame with
  `sort_values(by=["unix_timestamp"])` (default kind "quicksort", not stable) and groups by
  user (which keeps row order within a group). We make that frame from the same file and call
  the same pandas method, so ties come out as GR's would with this pandas and numpy; numpy's
  quicksort may differ across versions and CPUs (it dispatches to SIMD sorts), so an exact
  match with a GR run elsewhere is not guaranteed. sequences.txt holds one fixed order and
  lacks most timestamps, so that order cannot be derived from it (DataError).
- Partial timestamps (sequences.txt): a missing one is interpolated linearly between the
  nearest known ones in the same user's sequence (before the first known: the first; after the
  last: the last), rounded to whole seconds, so the order stays non-decreasing. A user with no
  known timestamp gets the median of all known timestamps on every event (all equal, so the
  order holds and the time gaps are zero). Known timestamps that go backwards along a user's
  line are a DataError.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .dataset import Catalog, DataError, Interactions
from .generic import (
    Field,
    is_blank,
    make_interactions,
    read_plain_table,
    record_line,
    require_file,
    rows_of_int_ids,
    split_genres,
    text_lines,
)

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
U_ITEM_LAYOUT = (
    "movie id|movie title|release date|video release date|IMDb URL|19 genre flags "
    f"({'|'.join(ML100K_GENRES)})"
)
U_DATA_FIELDS = (
    Field("user id"),
    Field("item id"),
    Field("rating", "number"),
    Field("timestamp"),
)
RATINGS_DAT_FIELDS = (
    Field("UserID"),
    Field("MovieID"),
    Field("Rating", "number"),
    Field("Timestamp"),
)
RATINGS_CSV_FIELDS = (
    Field("userId"),
    Field("movieId"),
    Field("rating", "number"),
    Field("timestamp"),
)
PARTIAL_FIELDS = (
    Field("user_id"),
    Field("movie_id"),
    Field("rating", "number"),
    Field("timestamp"),
)
EXTRAINFO_COLUMNS = (
    "MovieID",
    "Title",
    "Year",
    "Rated",
    "Released",
    "Genres",
    "Director",
    "Writers",
    "Actors",
    "Plot",
    "Poster",
)
# Extrainfo columns that become item text (the poster URL and the repeated title do not).
EXTRAINFO_TEXT = {
    "Rated": "rated",
    "Released": "released",
    "Genres": "genres",
    "Director": "director",
    "Writers": "writers",
    "Actors": "actors",
    "Plot": "plot",
}

_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-\u2013]\d{0,4})?\)\s*$")


def split_title(title: str) -> tuple[str, str | None]:
    """'Toy Story (1995)' -> ('Toy Story', '1995'); a title without a trailing year is kept."""
    match = _TITLE_YEAR.match(title)
    if match is None or not match.group("title"):
        return title.strip(), None
    return match.group("title"), match.group("year")


@dataclass
class _Movie:
    movie_id: int
    line: int
    title: str
    genres: tuple[str, ...]
    fields: dict[str, str] = field(default_factory=dict)


def _int_value(path: Path, line: int, name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(path, f"expected {name} to be an integer, got {value!r}", line) from None


def _catalog(path: Path, movies: list[_Movie]) -> tuple[np.ndarray, Catalog]:
    """(sorted int64 movie ids[n], Catalog in that order); duplicate ids are a DataError."""
    if not movies:
        raise DataError(path, "no movies in the file")
    first_line: dict[int, int] = {}
    for movie in movies:
        if movie.movie_id in first_line:
            raise DataError(
                path,
                f"movie id {movie.movie_id} appears again (first at line "
                f"{first_line[movie.movie_id]})",
                movie.line,
            )
        first_line[movie.movie_id] = movie.line
    movies = sorted(movies, key=lambda m: m.movie_id)
    for movie in movies:
        if movie.genres and "genres" not in movie.fields:
            movie.fields["genres"] = ", ".join(movie.genres)
    catalog = Catalog(
        ids=[str(m.movie_id) for m in movies],
        titles=[m.title for m in movies],
        fields=[m.fields for m in movies],
        genres=[m.genres for m in movies],
    )
    return np.array([m.movie_id for m in movies], dtype=np.int64), catalog


def _rows_or_error(
    path: Path,
    ids: np.ndarray,
    catalog_ids: np.ndarray,
    *,
    id_name: str,
    movie_file: str,
    sep: str,
    skip: int,
    encoding: str = "utf-8",
) -> np.ndarray:
    """Catalog rows of the movie ids read from `path`; an unknown id is a DataError at its line."""
    rows, known = rows_of_int_ids(ids, catalog_ids)
    if not known.all():
        first = int(np.argmin(known))
        line = record_line(path, first, sep=sep, skip=skip, encoding=encoding)
        raise DataError(path, f"{id_name} {ids[first]} is not in {movie_file}", line)
    return rows


def _unrated_note(catalog: Catalog, rows: np.ndarray) -> list[str]:
    unrated = int((np.bincount(rows, minlength=len(catalog) + 1)[1:] == 0).sum())
    return [f"{unrated} of {len(catalog)} catalog items have no interactions"] if unrated else []


# --- ML-100K ---------------------------------------------------------------------------------


def _read_u_item(path: Path) -> tuple[np.ndarray, Catalog]:
    require_file(path, U_ITEM_LAYOUT)
    movies = []
    for number, text in text_lines(path, "latin-1"):
        if is_blank(text, "|"):
            continue
        parts = text.split("|")
        if len(parts) != 5 + len(ML100K_GENRES):
            raise DataError(
                path,
                f"expected 24 fields separated by '|' ({U_ITEM_LAYOUT}), got {len(parts)}",
                number,
            )
        movie_id = _int_value(path, number, "movie id", parts[0].strip())
        flags = [f.strip() for f in parts[5:]]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(
                path, f"expected the 19 genre flags to be 0 or 1, got {'|'.join(flags)!r}", number
            )
        title, year = split_title(parts[1])
        release_year = parts[2].strip()[-4:]
        if year is None and release_year.isdecimal():  # 'dd-Mon-yyyy'
            year = release_year
        genres = tuple(g for g, flag in zip(ML100K_GENRES, flags, strict=True) if flag == "1")
        movies.append(_Movie(movie_id, number, title, genres, {"year": year} if year else {}))
    return _catalog(path, movies)


def read_ml100k(directory: Path, name: str = "ml-100k") -> Interactions:
    """MovieLens-100K from the official `u.data` + `u.item`."""
    directory = Path(directory)
    item_path = directory / "u.item"
    catalog_ids, catalog = _read_u_item(item_path)
    data_path = directory / "u.data"
    users, items, _ratings, timestamps = read_plain_table(data_path, "\t", U_DATA_FIELDS)
    rows = _rows_or_error(
        data_path, items, catalog_ids, id_name="item id", movie_file="u.item", sep="\t", skip=0
    )
    return make_interactions(
        name, catalog, users, rows, timestamps, notes=_unrated_note(catalog, rows)
    )


# --- ML-1M -----------------------------------------------------------------------------------


def _read_movies_dat(path: Path) -> list[_Movie]:
    require_file(path, "movies.dat: MovieID::Title::Genres")
    movies = []
    for number, text in text_lines(path, "latin-1"):
        if is_blank(text, "::"):
            continue
        parts = text.split("::")
        if len(parts) != 3:
            raise DataError(
                path,
                f"expected 3 fields separated by '::' (MovieID::Title::Genres), got {len(parts)}",
                number,
            )
        movie_id = _int_value(path, number, "MovieID", parts[0].strip())
        title, year = split_title(parts[1])
        genres = () if parts[2].strip() == "(no genres listed)" else split_genres(parts[2])
        movies.append(_Movie(movie_id, number, title, genres, {"year": year} if year else {}))
    return movies


def _add_extrainfos(path: Path, movies: list[_Movie]) -> list[str]:
    """Adds movies_extrainfos.dat's text to `movies` (in place); returns notes."""
    by_id = {m.movie_id: m for m in movies}
    described = 0
    for number, text in text_lines(path, "utf-8"):
        if is_blank(text, "::"):
            continue
        parts = text.split("::")
        if len(parts) != len(EXTRAINFO_COLUMNS):
            raise DataError(
                path,
                f"expected {len(EXTRAINFO_COLUMNS)} fields separated by '::' "
                f"({'::'.join(EXTRAINFO_COLUMNS)}), got {len(parts)}",
                number,
            )
        values = dict(zip(EXTRAINFO_COLUMNS, (p.strip() for p in parts), strict=True))
        movie_id = _int_value(path, number, "MovieID", values["MovieID"])
        movie = by_id.get(movie_id)
        if movie is None:
            raise DataError(path, f"MovieID {movie_id} is not in movies.dat", number)
        described += 1
        if "year" not in movie.fields and values["Year"][:4].isdecimal():
            movie.fields["year"] = values["Year"][:4]
        for column, key in EXTRAINFO_TEXT.items():
            if values[column] and values[column] != "N/A":
                movie.fields[key] = values[column]
    return [f"{path.name} describes {described} of {len(movies)} movies"]


def _ml1m_catalog(directory: Path) -> tuple[np.ndarray, Catalog, list[str]]:
    movies = _read_movies_dat(directory / "movies.dat")
    notes: list[str] = []
    extra = directory / "movies_extrainfos.dat"
    if extra.is_file():
        notes = _add_extrainfos(extra, movies)
    catalog_ids, catalog = _catalog(directory / "movies.dat", movies)
    return catalog_ids, catalog, notes


TIE_ORDERS = ("file", "gr")


def gr_event_order(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray
) -> np.ndarray:
    """Positions (in file order) of ratings.dat's events in the order GR's preprocessing lists
    them after `sort_values(by=["unix_timestamp"])` on the whole frame: sorted by timestamp,
    ties in whatever order pandas' default (unstable) quicksort leaves them."""
    integral = np.array_equal(ratings, np.round(ratings))
    frame = pd.DataFrame(  # the frame GR's pd.read_csv builds: int64 columns, a RangeIndex
        {
            "user_id": users.astype(np.int64),
            "movie_id": items.astype(np.int64),
            "rating": ratings.astype(np.int64) if integral else ratings,
            "unix_timestamp": timestamps.astype(np.int64),
        }
    )
    return frame.sort_values(by=["unix_timestamp"]).index.to_numpy(dtype=np.int64)


def read_ml1m(directory: Path, name: str = "ml-1m", tie_order: str = "file") -> Interactions:
    """MovieLens-1M from the official `ratings.dat` + `movies.dat` (+ movies_extrainfos.dat).
    `tie_order`: "file" (same-second ratings in file order) or "gr" (GR's order, see the
    module docstring)."""
    if tie_order not in TIE_ORDERS:
        raise DataError(
            "--tie-order", f"expected one of {', '.join(TIE_ORDERS)}, got {tie_order!r}"
        )
    directory = Path(directory)
    catalog_ids, catalog, notes = _ml1m_catalog(directory)
    path = directory / "ratings.dat"
    users, items, ratings, timestamps = read_plain_table(
        path, "::", RATINGS_DAT_FIELDS, what="UserID::MovieID::Rating::Timestamp"
    )
    rows = _rows_or_error(
        path, items, catalog_ids, id_name="MovieID", movie_file="movies.dat", sep="::", skip=0
    )
    notes += _unrated_note(catalog, rows)
    if tie_order == "gr":
        # Events in GR's global order; make_interactions' stable sort by (user, timestamp)
        # then keeps that order within each user, as GR's groupby does.
        order = gr_event_order(users, items, ratings, timestamps)
        by_file = np.lexsort((timestamps, users))  # lexsort is stable: today's "file" order
        by_gr = order[np.lexsort((timestamps[order], users[order]))]
        moved = by_file != by_gr
        notes.append(
            "ties in time: GR's order (pandas sort_values of the whole ratings.dat by "
            f"timestamp, unstable quicksort), not file order: {int(moved.sum()):,} events of "
            f"{len(np.unique(users[by_file[moved]])):,} users sit elsewhere in their sequence"
        )
        users, rows, timestamps = users[order], rows[order], timestamps[order]
    data = make_interactions(name, catalog, users, rows, timestamps, notes=notes)
    data.tie_order = tie_order
    return data


def _read_sequences(path: Path, catalog_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(user ids[U] int64, item rows per user) in file order from sequences.txt."""
    require_file(path, "one line per user: UserID MovieID MovieID ... (spaces)")
    users: list[int] = []
    sequences: list[np.ndarray] = []
    first_line: dict[int, int] = {}
    for number, text in text_lines(path, "utf-8"):
        parts = text.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(
                path,
                "expected a UserID followed by at least one MovieID, separated by spaces, "
                "got 1 field",
                number,
            )
        try:
            ids = np.array(parts, dtype=np.int64)
        except ValueError:
            bad = next(p for p in parts if not p.lstrip("-").isdecimal())
            raise DataError(path, f"expected integer ids, got {bad!r}", number) from None
        user = int(ids[0])
        if user in first_line:
            raise DataError(
                path, f"UserID {user} already has a line (line {first_line[user]})", number
            )
        first_line[user] = number
        rows, known = rows_of_int_ids(ids[1:], catalog_ids)
        if not known.all():
            raise DataError(
                path, f"MovieID {ids[1:][np.argmin(known)]} is not in movies.dat", number
            )
        users.append(user)
        sequences.append(rows)
    if not users:
        raise DataError(path, "the file is empty; expected one line per user: UserID MovieID ...")
    return np.array(users, dtype=np.int64), sequences


def read_ml1m_sequences(directory: Path, name: str = "ml-1m") -> Interactions:
    """MovieLens-1M from `sequences.txt` + `movies.dat` (+ `timestamps_partial.tsv`,
    `movies_extrainfos.dat`). Without the tsv the result has no time (`timestamps=None`)."""
    directory = Path(directory)
    catalog_ids, catalog, notes = _ml1m_catalog(directory)
    seq_path = directory / "sequences.txt"
    line_users, line_rows = _read_sequences(seq_path, catalog_ids)
    lengths = np.array([len(r) for r in line_rows], dtype=np.int64)
    event_users = np.repeat(line_users, lengths)  # [E], file order
    rows = np.concatenate(line_rows)  # [E]
    notes += _unrated_note(catalog, rows)
    tsv_path = directory / "timestamps_partial.tsv"
    if not tsv_path.is_file():
        notes.append("no timestamps_partial.tsv: no timestamps, time features off")
        return make_interactions(name, catalog, event_users, rows, None, notes=notes)
    timestamps, time_source, time_note = _partial_timestamps(
        tsv_path, seq_path, catalog_ids, line_users, lengths, rows
    )
    notes.append(time_note)
    return make_interactions(
        name, catalog, event_users, rows, timestamps, time_source=time_source, notes=notes
    )


def _partial_timestamps(
    tsv_path: Path,
    seq_path: Path,
    catalog_ids: np.ndarray,
    line_users: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
) -> tuple[np.ndarray, str, str]:
    """Timestamps[E] for the events of sequences.txt (file order): known ones from the tsv,
    the rest interpolated (see the module docstring). Returns (timestamps, time_source, note)."""
    header = "\t".join(f.name for f in PARTIAL_FIELDS)
    t_users, t_items, _ratings, t_times = read_plain_table(
        tsv_path, "\t", PARTIAL_FIELDS, header=header
    )

    def fail(index: int, problem: str) -> DataError:
        line = record_line(tsv_path, index, sep="\t", skip=1, encoding="utf-8")
        return DataError(tsv_path, problem, line)

    # Users as positions in sequences.txt, movies as catalog rows.
    by_user = np.argsort(line_users, kind="stable")
    where = np.minimum(np.searchsorted(line_users[by_user], t_users), len(line_users) - 1)
    t_lines = by_user[where]
    unknown_user = line_users[t_lines] != t_users
    if unknown_user.any():
        first = int(np.argmax(unknown_user))
        raise fail(first, f"user_id {t_users[first]} has no line in {seq_path.name}")
    t_rows, known = rows_of_int_ids(t_items, catalog_ids)
    if not known.all():
        first = int(np.argmin(known))
        raise fail(first, f"movie_id {t_items[first]} is not in movies.dat")

    # Match each tsv row to an event: same (user line, movie), the k-th tsv row of a pair to
    # the k-th event of that pair (ML-1M has no repeats, other data might).
    span = len(catalog_ids) + 1
    event_keys = pd.DataFrame({"key": np.repeat(np.arange(len(lengths)), lengths) * span + rows})
    event_keys["k"] = event_keys.groupby("key").cumcount()
    event_keys["event"] = np.arange(len(event_keys))
    tsv_keys = pd.DataFrame({"key": t_lines * span + t_rows})
    tsv_keys["k"] = tsv_keys.groupby("key").cumcount()
    matched = tsv_keys.merge(event_keys, on=["key", "k"], how="left", sort=False)
    missing = matched["event"].isna().to_numpy()
    if missing.any():
        first = int(np.argmax(missing))
        raise fail(
            first,
            f"user {t_users[first]}'s line in {seq_path.name} has no (further) movie "
            f"{t_items[first]}",
        )
    events = matched["event"].to_numpy(dtype=np.int64)  # [T] event index of each tsv row

    num_events = len(rows)
    known_time = np.full(num_events, -1, dtype=np.int64)
    tsv_row_of_event = np.full(num_events, -1, dtype=np.int64)
    known_time[events] = t_times
    tsv_row_of_event[events] = np.arange(len(events))
    is_known = tsv_row_of_event >= 0
    median = int(np.median(t_times))
    timestamps = np.empty(num_events, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    no_time_users = no_time_events = 0
    for start, length, user in zip(starts, lengths, line_users, strict=True):
        span_known = is_known[start : start + length]
        if not span_known.any():
            timestamps[start : start + length] = median
            no_time_users += 1
            no_time_events += int(length)
            continue
        positions = np.flatnonzero(span_known)  # [k] positions with a known time
        times = known_time[start : start + length][positions]
        backwards = np.flatnonzero(np.diff(times) < 0)
        if len(backwards):
            later = start + positions[backwards[0] + 1]
            earlier = start + positions[backwards[0]]
            raise fail(
                int(tsv_row_of_event[later]),
                f"timestamp {known_time[later]} is earlier than {known_time[earlier]} of "
                f"movie {catalog_ids[rows[earlier] - 1]}, which comes before it in user "
                f"{user}'s line of {seq_path.name}",
            )
        filled = np.interp(np.arange(length), positions, times)  # ends take the nearest known
        timestamps[start : start + length] = np.rint(filled).astype(np.int64)
    timestamps[is_known] = known_time[is_known]
    num_known = int(is_known.sum())
    if num_known == num_events:
        return timestamps, "observed", f"timestamps: all {num_events:,} from {tsv_path.name}"
    interpolated = num_events - num_known - no_time_events
    note = (
        f"timestamps: {num_known:,} of {num_events:,} known from {tsv_path.name}; "
        f"{interpolated:,} interpolated between the nearest known ones of the same user; "
        f"{no_time_events:,} events of {no_time_users:,} users with none known set to the "
        f"median known timestamp {median}"
    )
    return timestamps, "interpolated", note


# --- ML-20M / ML-25M / ml-latest ------------------------------------------------------------


def _read_movies_csv(path: Path) -> tuple[np.ndarray, Catalog]:
    require_file(path, "movies.csv: movieId,title,genres")
    movies = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader, [])]
            if header != ["movieId", "title", "genres"]:
                raise DataError(
                    path, f"expected the header 'movieId,title,genres', got {header}", 1
                )
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if len(record) != 3:
                    raise DataError(
                        path,
                        "expected 3 comma-separated fields (movieId,title,genres), "
                        f"got {len(record)}",
                        reader.line_num,
                    )
                movie_id = _int_value(path, reader.line_num, "movieId", record[0].strip())
                title, year = split_title(record[1])
                genres = (
                    () if record[2].strip() == "(no genres listed)" else split_genres(record[2])
                )
                movies.append(
                    _Movie(movie_id, reader.line_num, title, genres, {"year": year} if year else {})
                )
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not valid utf-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(path, f"malformed CSV ({exc})", reader.line_num) from None
    return _catalog(path, movies)


def read_movielens_csv(directory: Path, name: str | None = None) -> Interactions:
    """MovieLens-20M / 25M / ml-latest(-small): `ratings.csv` + `movies.csv` (tags, links
    are not used). The name defaults to the directory's name."""
    directory = Path(directory)
    catalog_ids, catalog = _read_movies_csv(directory / "movies.csv")
    path = directory / "ratings.csv"
    header = ",".join(f.name for f in RATINGS_CSV_FIELDS)
    users, items, _ratings, timestamps = read_plain_table(
        path, ",", RATINGS_CSV_FIELDS, header=header
    )
    rows = _rows_or_error(
        path, items, catalog_ids, id_name="movieId", movie_file="movies.csv", sep=",", skip=1
    )
    return make_interactions(
        name or directory.resolve().name,
        catalog,
        users,
        rows,
        timestamps,
        notes=_unrated_note(catalog, rows),
    )
