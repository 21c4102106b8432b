"""Data readers on small files written here, plus the shared ML-1M copy when it is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sidrec.offline.data.dataset import DataError, Interactions, group_by_user, id_order
from sidrec.offline.data.generic import read_generic, read_recbole
from sidrec.offline.data.load import detect_format, load_dataset
from sidrec.offline.data.movielens import (
    read_ml1m,
    read_ml1m_sequences,
    read_ml100k,
    read_movielens_csv,
    split_title,
)

SHARED_ML1M = Path("/work/shared/data/ml-1m")


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def item_ids(data: Interactions, user: str) -> list[str]:
    """A user's sequence as external item ids."""
    sequence = data.sequences[data.users.index(user)]
    return [data.catalog.ids[row - 1] for row in sequence]


def user_times(data: Interactions, user: str) -> list[int]:
    assert data.timestamps is not None
    return data.timestamps[data.users.index(user)].tolist()


def error_of(call, *args) -> str:
    with pytest.raises(DataError) as info:
        call(*args)
    return str(info.value)


# --- shared helpers ---------------------------------------------------------------------------


def test_group_by_user_is_stable_on_both_sort_paths() -> None:
    users = np.array([1, 0, 1, 0, 1, 0])
    items = np.array([10, 20, 30, 40, 50, 60])
    times = np.array([5, 7, 5, 7, 1, 3])
    (rows,) = group_by_user(users, 2, [items], [times])
    assert [r.tolist() for r in rows] == [[60, 20, 40], [50, 10, 30]]
    # A span too wide for the one-key fast path takes the multi-pass path: same order.
    wide = times.astype(np.int64) * (2**59)  # span * users > 2**62
    (rows,) = group_by_user(users, 2, [items], [wide])
    assert [r.tolist() for r in rows] == [[60, 20, 40], [50, 10, 30]]
    # No key: file order within each user.
    (rows,) = group_by_user(users, 2, [items])
    assert [r.tolist() for r in rows] == [[20, 40, 60], [10, 30, 50]]


def test_id_order_and_title_split() -> None:
    assert id_order(["10", "9", "100"]) == [1, 0, 2]
    assert id_order(["b", "a", "10"]) == [0, 1, 2]  # not all numeric: file order
    assert split_title("Toy Story (1995)") == ("Toy Story", "1995")
    assert split_title("American President, The (1995) ") == ("American President, The", "1995")
    assert split_title("Babylon 5") == ("Babylon 5", None)
    assert split_title("Land Before Time III (1995) (V)") == (
        "Land Before Time III (1995) (V)",
        None,
    )


# --- MovieLens-100K ---------------------------------------------------------------------------

U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "2|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
    "3|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "10|Odd (V)|01-Feb-1994||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|1\n"
)
# User 10 rates 2 and 1 in the same second: file order decides. User 2 comes before 10.
U_DATA = "10\t2\t4\t500\n2\t1\t5\t900\n10\t1\t3\t500\n2\t2\t1\t100\n10\t3\t2\t400\n"


def write_ml100k(directory: Path) -> Path:
    write(directory / "u.item", U_ITEM, encoding="latin-1")
    write(directory / "u.data", U_DATA)
    return directory


def test_ml100k_official(tmp_path: Path) -> None:
    data = read_ml100k(write_ml100k(tmp_path))
    assert data.name == "ml-100k" and data.time_source == "observed"
    assert data.catalog.ids == ["1", "2", "3", "10"]
    assert data.catalog.titles == ["Toy Story", "Misérables, Les", "unknown", "Odd (V)"]
    assert data.catalog.genres[0] == ("Animation", "Children's", "Comedy")
    assert data.catalog.fields[1] == {"year": "1995", "genres": "Drama, Musical"}
    assert data.catalog.genres[2] == ("unknown",)
    assert data.catalog.fields[3]["year"] == "1994"  # from the release date
    assert data.users == ["2", "10"]
    assert item_ids(data, "2") == ["2", "1"]
    assert item_ids(data, "10") == ["3", "2", "1"]  # 2 before 1: same second, file order
    assert user_times(data, "10") == [400, 500, 500]
    assert data.num_events == 5 and data.sequences[0].dtype == np.int64
    assert data.notes == ["1 of 4 catalog items have no interactions"] or data.notes == []


def test_ml100k_bad_files(tmp_path: Path) -> None:
    write_ml100k(tmp_path)
    write(tmp_path / "u.data", "1\t1\t5\t100\n\n1\t2\t4\n")
    assert error_of(read_ml100k, tmp_path) == (
        f"{tmp_path / 'u.data'}, line 3: expected 4 fields separated by tabs "
        "(user id, item id, rating, timestamp), got 3"
    )
    write(tmp_path / "u.data", "1\t1\t5\t100\n1\t99\t4\t100\n")
    assert error_of(read_ml100k, tmp_path).endswith("u.data, line 2: item id 99 is not in u.item")
    write(tmp_path / "u.data", "1\t1\tfive\t100\n")
    assert "line 1: expected rating to be a number, got 'five'" in error_of(read_ml100k, tmp_path)
    write(tmp_path / "u.item", U_ITEM.replace("|0|0|0|1|1|1|", "|0|0|0|1|1|2|", 1), "latin-1")
    message = error_of(read_ml100k, tmp_path)
    assert "u.item, line 1: expected the 19 genre flags to be 0 or 1" in message
    write(tmp_path / "u.item", "1|Toy Story (1995)|01-Jan-1995\n", "latin-1")
    assert "u.item, line 1: expected 24 fields separated by '|' (movie id|" in error_of(
        read_ml100k, tmp_path
    )
    (tmp_path / "u.item").unlink()
    assert "u.item: file not found" in error_of(read_ml100k, tmp_path)


def test_recbole_atomic_matches_official(tmp_path: Path) -> None:
    official = read_ml100k(write_ml100k(tmp_path / "official"))
    recbole = tmp_path / "rb"
    write(
        recbole / "ml-100k.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tOdd (V)\t1994\tWestern\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tMisérables, Les\t1995\tDrama Musical\n"
        "3\tunknown\tunkonwn\tunknown\n",
    )
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    inter += "".join(f"{line}\n" for line in U_DATA.splitlines()).replace("\t400\n", "\t400.7\n")
    write(recbole / "ml-100k.inter", inter)
    data = read_recbole(recbole)
    assert data.name == "ml-100k"
    assert data.catalog.ids == official.catalog.ids  # numeric order, not file order
    assert data.catalog.titles == official.catalog.titles
    assert data.catalog.fields == official.catalog.fields
    assert data.catalog.genres == official.catalog.genres
    assert data.users == official.users
    for a, b in zip(data.sequences, official.sequences, strict=True):
        assert a.tolist() == b.tolist()
    assert user_times(data, "10") == [400, 500, 500]  # 400.7 floored
    data = load_dataset(recbole / "ml-100k.item", name="mine")  # a file inside the folder works
    assert data.name == "mine" and data.num_events == 5

    write(recbole / "ml-100k.inter", "user_id:token\titem_id:token\n1\t1\n1\t77\n")
    assert error_of(read_recbole, recbole).endswith(
        "ml-100k.inter, line 3: item_id '77' is not in ml-100k.item"
    )
    write(recbole / "ml-100k.inter", "user_id:token\titem_id:token\n1\t1\n\t2\n")
    assert error_of(read_recbole, recbole).endswith("ml-100k.inter, line 3: user_id is empty")
    write(recbole / "ml-100k.inter", "user_id\titem_id\n1\t1\n")
    assert "line 1: expected a RecBole header of tab-separated name:type cells" in error_of(
        read_recbole, recbole
    )


# --- MovieLens-1M -----------------------------------------------------------------------------

MOVIES_DAT = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
    "3::Città (1996)::Drama\n"
    "4::Never Rated (1997)::Horror\n"
)
EXTRAINFOS = (
    "1::Toy Story::1995::G::22 Nov 1995::Animation, Adventure, Comedy::John Lasseter::"
    "Joss Whedon::Tom Hanks, Tim Allen::A cowboy doll.::https://poster\r\n"
    "2::Jumanji::1995::PG::N/A::Adventure, Family::Joe Johnston::N/A::Robin Williams::"
    "A board game.::N/A\r\n"
)


def write_ml1m_movies(directory: Path, extrainfos: bool = True) -> None:
    write(directory / "movies.dat", MOVIES_DAT, encoding="latin-1")
    if extrainfos:
        write(directory / "movies_extrainfos.dat", EXTRAINFOS)


def test_ml1m_ratings_dat(tmp_path: Path) -> None:
    write_ml1m_movies(tmp_path)
    write(
        tmp_path / "ratings.dat",
        "1::3::4::978300760\r\n1::1::5::978300760\r\n1::2::3::978300100\r\n"
        "6040::2::3::978300000\r\n5::1::1::978000000\r\n",
    )
    data = load_dataset(tmp_path)
    assert data.name == "ml-1m" and data.time_source == "observed"
    assert data.catalog.ids == ["1", "2", "3", "4"]  # the never-rated movie 4 included
    assert data.users == ["1", "5", "6040"]
    assert item_ids(data, "1") == ["2", "3", "1"]  # 3 and 1 tie: file order
    assert user_times(data, "1") == [978300100, 978300760, 978300760]
    assert data.catalog.titles[2] == "Città"  # latin-1
    toy = data.catalog.fields[0]
    assert toy == {
        "year": "1995",
        "rated": "G",
        "released": "22 Nov 1995",
        "genres": "Animation, Adventure, Comedy",
        "director": "John Lasseter",
        "writers": "Joss Whedon",
        "actors": "Tom Hanks, Tim Allen",
        "plot": "A cowboy doll.",
    }
    assert "released" not in data.catalog.fields[1] and "writers" not in data.catalog.fields[1]
    assert data.catalog.genres[0] == ("Animation", "Children's", "Comedy")  # MovieLens' own
    assert data.catalog.fields[3] == {"year": "1997", "genres": "Horror"}
    assert "movies_extrainfos.dat describes 2 of 4 movies" in data.notes


@pytest.mark.parametrize(
    ("ratings", "expected"),
    [
        (
            "1::1::5::978300760\n1::2::3\n",
            "line 2: expected 4 fields separated by '::' (UserID::MovieID::Rating::Timestamp), "
            "got 3",
        ),
        ("1::1::5::978300760::9\n", "line 1: expected 4 fields separated by '::'"),
        (
            "1::1::5::978300760\n\n1::2::3::97830x\n",
            "line 3: expected Timestamp to be an integer, got '97830x'",
        ),
        (
            "1::1::5::978300760\n1::2::3::978300760.5\n",
            "line 2: expected Timestamp to be an integer",
        ),
        ("1::1::5::1\n\n\n1::99::3::2\n", "line 4: MovieID 99 is not in movies.dat"),
        ("x::1::5::1\n", "line 1: expected UserID to be an integer, got 'x'"),
        ("", "no data lines; expected 4 fields separated by '::'"),
    ],
)
def test_ml1m_bad_ratings(tmp_path: Path, ratings: str, expected: str) -> None:
    write_ml1m_movies(tmp_path)
    write(tmp_path / "ratings.dat", ratings)
    message = error_of(read_ml1m, tmp_path)
    assert message.startswith(str(tmp_path / "ratings.dat"))
    assert expected in message


def test_ml1m_bad_movie_files(tmp_path: Path) -> None:
    write(tmp_path / "ratings.dat", "1::1::5::978300760\n")
    assert "movies.dat: file not found (expected movies.dat: MovieID::Title::Genres)" in error_of(
        read_ml1m, tmp_path
    )
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::Comedy\n2::Broken (1995)\n", "latin-1")
    assert (
        "movies.dat, line 2: expected 3 fields separated by '::' (MovieID::Title::Genres), got 2"
        in (error_of(read_ml1m, tmp_path))
    )
    write(tmp_path / "movies.dat", "1::A (1995)::Comedy\n1::B (1995)::Drama\n", "latin-1")
    assert "movies.dat, line 2: movie id 1 appears again (first at line 1)" in error_of(
        read_ml1m, tmp_path
    )
    write_ml1m_movies(tmp_path, extrainfos=False)
    write(tmp_path / "movies_extrainfos.dat", "9::X::1999::G::x::y::z::w::v::u::t\n")
    assert "movies_extrainfos.dat, line 1: MovieID 9 is not in movies.dat" in error_of(
        read_ml1m, tmp_path
    )
    (tmp_path / "movies_extrainfos.dat").unlink()
    (tmp_path / "ratings.dat").unlink()
    assert "ratings.dat: file not found" in error_of(read_ml1m, tmp_path)


def write_tied_ratings(directory: Path) -> Path:
    """movies.dat with 60 movies + a ratings.dat of 3 users x 40 ratings over 3 distinct
    seconds each, lines per user in a shuffled order: many same-second ties, more than the 16
    rows below which numpy's quicksort is an (in effect stable) insertion sort."""
    rng = np.random.default_rng(0)
    movies = "".join(f"{m}::Movie {m} (1990)::Drama\n" for m in range(1, 61))
    write(directory / "movies.dat", movies, encoding="latin-1")
    lines = []
    for user in (1, 2, 3):
        for movie in rng.permutation(60)[:40] + 1:
            lines.append(
                f"{user}::{movie}::{int(rng.integers(1, 6))}::{978300000 + int(rng.integers(3))}\n"
            )
    return write(directory / "ratings.dat", "".join(lines))


def test_ml1m_tie_order_gr_is_grs_pandas_order(tmp_path: Path) -> None:
    path = write_tied_ratings(tmp_path)
    by_file = load_dataset(tmp_path)
    by_gr = load_dataset(tmp_path, tie_order="gr")
    assert (by_file.tie_order, by_gr.tie_order) == ("file", "gr")
    assert by_gr.name == "ml-1m" and any("GR's order" in note for note in by_gr.notes)

    # GR's research preprocessing, ML-1M branch, verbatim (plus the explicit engine pandas
    # would fall back to for the two-character separator, and the sort kind it defaults to).
    ratings = pd.read_csv(
        path, sep="::", names=["user_id", "movie_id", "rating", "unix_timestamp"], engine="python"
    )
    assert (ratings.dtypes == np.int64).all()
    grouped = ratings.sort_values(by=["unix_timestamp"], kind="quicksort").groupby("user_id")
    gr_items = grouped.movie_id.apply(list)
    gr_times = grouped.unix_timestamp.apply(list)
    # Today's rule: stable by (timestamp, line in the file).
    stable = ratings.sort_values(by=["unix_timestamp"], kind="stable").groupby("user_id")
    file_items = stable.movie_id.apply(list)

    for user in ("1", "2", "3"):
        assert item_ids(by_gr, user) == [str(m) for m in gr_items[int(user)]]
        assert user_times(by_gr, user) == gr_times[int(user)]
        assert item_ids(by_file, user) == [str(m) for m in file_items[int(user)]]
        assert sorted(item_ids(by_gr, user)) == sorted(item_ids(by_file, user))
    # The rules differ on these ties (quicksort is not stable), so the option does something.
    assert any(item_ids(by_gr, u) != item_ids(by_file, u) for u in ("1", "2", "3"))


def test_ml1m_tie_order_refusals(tmp_path: Path) -> None:
    write_ml1m_movies(tmp_path / "seq", extrainfos=False)
    write(tmp_path / "seq" / "sequences.txt", "7 1 2 3\n")
    message = error_of(lambda p: load_dataset(p, tie_order="gr"), tmp_path / "seq")
    assert message.startswith(str(tmp_path / "seq" / "sequences.txt"))
    assert "tie order 'gr' needs ratings.dat" in message and "cannot be derived" in message
    write_ml100k(tmp_path / "100k")
    assert "MovieLens-1M's ratings.dat only" in error_of(
        lambda p: load_dataset(p, tie_order="gr"), tmp_path / "100k"
    )
    assert "expected one of file, gr, got 'random'" in error_of(
        lambda p: load_dataset(p, tie_order="random"), tmp_path / "seq"
    )
    assert load_dataset(tmp_path / "seq").tie_order == "file"  # every reader's default


# sequences.txt: user 7's known times sit at positions 1 and 3; user 3 has none known.
SEQUENCES = "7 1 2 3 4 2\n3 4 1\n"
PARTIAL = "user_id\tmovie_id\trating\ttimestamp\n7\t2\t5\t1000\n7\t4\t3\t2000\n9\t1\t4\t100\n"


def test_ml1m_sequences_interpolate(tmp_path: Path) -> None:
    write_ml1m_movies(tmp_path, extrainfos=False)
    write(tmp_path / "sequences.txt", SEQUENCES)
    no_time = load_dataset(tmp_path)
    assert no_time.timestamps is None and no_time.time_source == "none"
    assert item_ids(no_time, "7") == ["1", "2", "3", "4", "2"]  # the file order is the order

    write(tmp_path / "timestamps_partial.tsv", PARTIAL.replace("9\t1\t4\t100\n", ""))
    data = load_dataset(tmp_path)
    assert data.time_source == "interpolated"
    assert data.users == ["3", "7"]
    assert item_ids(data, "7") == ["1", "2", "3", "4", "2"]
    # position 0 takes the nearest known (1000); 2 is halfway; the end keeps the last known.
    assert user_times(data, "7") == [1000, 1000, 1500, 2000, 2000]
    # No known time for user 3: the median of all known (1000, 2000) on every event.
    assert user_times(data, "3") == [1500, 1500]
    assert data.notes[-1] == (
        "timestamps: 2 of 7 known from timestamps_partial.tsv; 3 interpolated between the "
        "nearest known ones of the same user; 2 events of 1 users with none known set to the "
        "median known timestamp 1500"
    )
    # A repeated movie: the k-th tsv row of (user, movie) is the k-th such event.
    write(tmp_path / "timestamps_partial.tsv", PARTIAL.split("9\t")[0] + "7\t2\t1\t3000\n")
    data = load_dataset(tmp_path)
    assert user_times(data, "7") == [1000, 1000, 1500, 2000, 3000]


@pytest.mark.parametrize(
    ("sequences", "partial", "file", "expected"),
    [
        (
            SEQUENCES,
            PARTIAL,
            "timestamps_partial.tsv",
            "line 4: user_id 9 has no line in sequences.txt",
        ),
        (
            SEQUENCES,
            PARTIAL.replace("9\t1\t4\t100\n", "3\t2\t4\t100\n"),
            "timestamps_partial.tsv",
            "line 4: user 3's line in sequences.txt has no (further) movie 2",
        ),
        (
            SEQUENCES,
            PARTIAL.replace("2000", "500").replace("9\t1\t4\t100\n", ""),
            "timestamps_partial.tsv",
            "line 3: timestamp 500 is earlier than 1000 of movie 2, "
            "which comes before it in user 7's line",
        ),
        (
            SEQUENCES,
            "user\tmovie\ttimestamp\n",
            "timestamps_partial.tsv",
            "line 1: expected the header line 'user_id\\tmovie_id\\trating\\ttimestamp'",
        ),
        ("7 1 2\n\n7 3\n", None, "sequences.txt", "line 3: UserID 7 already has a line (line 1)"),
        ("7 1 2\n8 1 99\n", None, "sequences.txt", "line 2: MovieID 99 is not in movies.dat"),
        ("7 1 2\n8 1 x2\n", None, "sequences.txt", "line 2: expected integer ids, got 'x2'"),
        (
            "7\n",
            None,
            "sequences.txt",
            "line 1: expected a UserID followed by at least one MovieID",
        ),
        ("\n", None, "sequences.txt", "the file is empty"),
    ],
)
def test_ml1m_sequences_bad_files(
    tmp_path: Path, sequences: str, partial: str | None, file: str, expected: str
) -> None:
    write_ml1m_movies(tmp_path, extrainfos=False)
    write(tmp_path / "sequences.txt", sequences)
    if partial is not None:
        write(tmp_path / "timestamps_partial.tsv", partial)
    message = error_of(read_ml1m_sequences, tmp_path)
    assert message.startswith(str(tmp_path / file))
    assert expected in message


@pytest.mark.skipif(not SHARED_ML1M.is_dir(), reason=f"{SHARED_ML1M} is not on this machine")
def test_shared_ml1m() -> None:
    data = load_dataset(SHARED_ML1M)
    assert (len(data.users), data.num_items, data.num_events) == (6040, 3883, 1_000_209)
    assert data.time_source == "interpolated"
    # User 1's sequence is sequences.txt's first line, in the file's order.
    first = (SHARED_ML1M / "sequences.txt").read_text().split("\n", 1)[0].split()
    assert data.users[0] == first[0] == "1"
    assert item_ids(data, "1") == first[1:]
    assert data.timestamps is not None
    assert all((np.diff(t) >= 0).all() for t in data.timestamps)
    assert len(np.unique(np.concatenate(data.sequences))) == 3706
    assert data.catalog.fields[0]["director"] == "John Lasseter"


# --- MovieLens-20M / ml-latest ----------------------------------------------------------------

MOVIES_CSV = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\n'
    "2,Babylon 5,(no genres listed)\n"
)


def test_movielens_csv(tmp_path: Path) -> None:
    directory = tmp_path / "ml-latest-small"
    write(directory / "movies.csv", MOVIES_CSV)
    write(
        directory / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,11,4.0,964982703\n1,1,4.0,964981247\n"
        "1,2,3.5,964982703\n",
    )
    data = load_dataset(directory)
    assert data.name == "ml-latest-small"
    assert data.catalog.ids == ["1", "2", "11"]
    assert data.catalog.titles == ["Toy Story", "Babylon 5", "American President, The"]
    assert data.catalog.genres[1] == () and data.catalog.fields[1] == {}
    assert data.catalog.fields[2] == {"year": "1995", "genres": "Comedy, Drama, Romance"}
    assert item_ids(data, "1") == ["1", "11", "2"]

    write(directory / "ratings.csv", "user,movie,rating,timestamp\n1,1,4.0,1\n")
    assert error_of(read_movielens_csv, directory).endswith(
        "ratings.csv, line 1: expected the header line 'userId,movieId,rating,timestamp', "
        "got 'user,movie,rating,timestamp'"
    )
    write(directory / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,1\n1,5,4.0,1\n")
    assert error_of(read_movielens_csv, directory).endswith(
        "ratings.csv, line 3: movieId 5 is not in movies.csv"
    )
    write(directory / "movies.csv", MOVIES_CSV + '3,"Unclosed (1999),Drama\n')
    assert "movies.csv, line" in error_of(read_movielens_csv, directory)


# --- generic ----------------------------------------------------------------------------------


def test_generic_csv_timestamp(tmp_path: Path) -> None:
    write(
        tmp_path / "items.csv",
        'item_id,title,genres,plot\nB7,Blue shirt,"Clothes, Summer",A blue shirt.\n'
        "A1,Red hat,Hats|Red,\n",
    )
    write(
        tmp_path / "interactions.csv",
        "user_id,item_id,timestamp,rating\nu2,B7,50,1\nu1,A1,20,1\nu1,B7,10,2\n"
        "u1,Z9,20,1\nu2,A1,40,3\n",
    )
    data = load_dataset(tmp_path, name="shop")
    assert data.name == "shop" and data.time_source == "observed"
    # Ids are not all numeric: items-file order, then the undescribed Z9 appended.
    assert data.catalog.ids == ["B7", "A1", "Z9"]
    assert data.catalog.titles == ["Blue shirt", "Red hat", ""]
    assert data.catalog.fields[0] == {"plot": "A blue shirt.", "genres": "Clothes, Summer"}
    assert data.catalog.genres[1] == ("Hats", "Red")
    assert data.catalog.fields[2] == {} and data.catalog.genres[2] == ()
    assert data.users == ["u2", "u1"]  # first appearance
    assert item_ids(data, "u1") == ["B7", "A1", "Z9"]  # A1 and Z9 tie at 20: file order
    assert user_times(data, "u2") == [40, 50]
    assert data.notes == [
        "1 item ids in interactions.csv are not in items.csv; added with empty text (e.g. 'Z9')"
    ]


def test_generic_order_and_no_time(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", 'item_id,title,plot\n10,Ten,"Two\nlines"\n9,Nine,\n')
    write(tmp_path / "interactions.csv", "user_id,item_id,order\n2,10,2.5\n2,9,1\n10,9,1\n")
    data = load_dataset(tmp_path)
    assert data.name == tmp_path.name
    assert data.timestamps is None and data.time_source == "none"
    assert data.catalog.ids == ["9", "10"] and data.users == ["2", "10"]  # numeric order
    assert item_ids(data, "2") == ["9", "10"]
    assert data.catalog.fields[1] == {"plot": "Two\nlines"}

    write(tmp_path / "interactions.csv", "user_id,item_id\n2,10\n2,9\n")
    assert item_ids(load_dataset(tmp_path), "2") == ["10", "9"]  # file order


def test_generic_timestamps_that_are_positions_become_order(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,title\n1,One\n2,Two\n3,Three\n")
    # Every user's values are consecutive integers (from 0 or from 1, in any file order).
    write(
        tmp_path / "interactions.csv",
        "user_id,item_id,timestamp\nu1,3,1\nu1,1,0\nu1,2,2\nu2,2,2\nu2,1,1\nu3,3,0\n",
    )
    data = load_dataset(tmp_path)
    assert data.timestamps is None and data.time_source == "none"
    assert item_ids(data, "u1") == ["1", "3", "2"] and item_ids(data, "u2") == ["1", "2"]
    assert data.notes == [
        "interactions.csv: column 'timestamp' holds positions, not unix seconds (every user's "
        "values are consecutive integers, all below 1,000,000); used as order (as if the "
        "column were named 'order'), no time features"
    ]

    # Real unix seconds, even one second apart for a user: kept as time, no note.
    write(
        tmp_path / "interactions.csv",
        "user_id,item_id,timestamp\nu1,3,1700000001\nu1,1,1700000000\nu2,2,1700000500\n",
    )
    data = load_dataset(tmp_path)
    assert data.time_source == "observed" and data.notes == []
    assert user_times(data, "u1") == [1_700_000_000, 1_700_000_001]

    # Small values with a gap (or a repeat) are not positions: kept as they are.
    write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu1,3,0\nu1,1,5\n")
    data = load_dataset(tmp_path)
    assert data.time_source == "observed" and data.notes == []


def test_generic_parquet(tmp_path: Path) -> None:
    items = {"item_id": [1, 2], "title": ["One", "Two"], "genres": [["a", "b"], None]}
    pd.DataFrame(items).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame(
        {
            "user_id": [5, 5, 6],
            "item_id": [2, 1, 2],
            "timestamp": pd.to_datetime(["2020-01-02", "2020-01-01", "2020-01-01"]),
        }
    ).to_parquet(tmp_path / "interactions.parquet")
    data = load_dataset(tmp_path)
    assert data.catalog.ids == ["1", "2"] and data.catalog.fields[1] == {}
    assert data.catalog.genres[0] == ("a", "b") and data.catalog.fields[0] == {"genres": "a, b"}
    assert item_ids(data, "5") == ["1", "2"]
    assert user_times(data, "5") == [1577836800, 1577923200]

    pd.DataFrame({"user_id": [5, 6], "item_id": [1, 2], "timestamp": ["x", "y"]}).to_parquet(
        tmp_path / "interactions.parquet"
    )
    assert "row 1: expected timestamp to be integer unix seconds or a datetime" in error_of(
        read_generic, tmp_path
    )
    pd.DataFrame({"user": [5], "item_id": [1]}).to_parquet(tmp_path / "interactions.parquet")
    assert "expected columns user_id, item_id and optionally timestamp" in error_of(
        read_generic, tmp_path
    )


@pytest.mark.parametrize(
    ("interactions", "items", "file", "expected"),
    [
        (
            "user,item\n1,1\n",
            None,
            "interactions.csv",
            "line 1: expected a header with columns user_id, item_id",
        ),
        (
            "user_id,item_id,timestamp\n1,1,5\n\n1,1,5.5\n",
            None,
            "interactions.csv",
            "line 4: expected timestamp (integer unix seconds) to be an integer, got '5.5'",
        ),
        (
            "user_id,item_id,timestamp\n1,1,5\n,1,6\n",
            None,
            "interactions.csv",
            "line 3: user_id is empty",
        ),
        (
            "user_id,item_id,timestamp\n1,1,5\n1,1\n",
            None,
            "interactions.csv",
            "line 3: expected 3 comma-separated fields (user_id,item_id,timestamp), got 2",
        ),
        (
            "user_id,item_id,timestamp\n1,1,5,7\n",
            None,
            "interactions.csv",
            "line 2: expected 3 comma-separated fields",
        ),
        (
            "user_id,item_id,order\n1,1,first\n",
            None,
            "interactions.csv",
            "line 2: expected order to be a number, got 'first'",
        ),
        ("user_id,item_id\n", None, "interactions.csv", "no data lines after the header"),
        ("", None, "interactions.csv", "the file is empty"),
        (
            "user_id,item_id\n1,1\n",
            "item_id,title\n1,A\n1,B\n",
            "items.csv",
            "line 3: item_id '1' appears again (first at line 2)",
        ),
        (
            "user_id,item_id\n1,1\n",
            "id,title\n1,A\n",
            "items.csv",
            "line 1: expected an item_id column",
        ),
        (
            "user_id,item_id\n1,1\n",
            "item_id,title\n1,A,extra\n",
            "items.csv",
            "line 2: expected 2 comma-separated fields (item_id,title), got 3",
        ),
    ],
)
def test_generic_bad_files(
    tmp_path: Path, interactions: str, items: str | None, file: str, expected: str
) -> None:
    write(tmp_path / "interactions.csv", interactions)
    write(tmp_path / "items.csv", items if items is not None else "item_id,title\n1,One\n")
    message = error_of(read_generic, tmp_path)
    assert message.startswith(str(tmp_path / file))
    assert expected in message


def test_generic_bad_encoding_names_the_line(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "item_id,title\n1,One\n")
    (tmp_path / "interactions.csv").write_bytes(b"user_id,item_id\n1,1\n2,\xff\n")
    assert "interactions.csv, line 3: not valid utf-8" in error_of(read_generic, tmp_path)


# --- format detection -------------------------------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    cases = {
        "ml-100k": ["u.data", "u.item"],
        "recbole": ["x.inter", "x.item"],
        "ml-1m": ["ratings.dat", "movies.dat", "sequences.txt"],  # ratings.dat wins
        "ml-1m-sequences": ["sequences.txt", "movies.dat"],
        "movielens-csv": ["ratings.csv", "movies.csv"],
        "generic": ["interactions.parquet", "items.csv"],
    }
    for key, files in cases.items():
        for file in files:
            write(tmp_path / key / file, "")
        assert detect_format(tmp_path / key).key == key
    (tmp_path / "empty").mkdir()
    message = error_of(load_dataset, tmp_path / "empty")
    assert message.startswith(f"{tmp_path / 'empty'}: no known data set files here. Looked for: ")
    for marker in (
        "u.data",
        "*.inter",
        "ratings.dat",
        "sequences.txt",
        "ratings.csv",
        "interactions.*",
    ):
        assert marker in message
    assert "no such file or directory" in error_of(load_dataset, tmp_path / "missing")
    assert f"(data found in {tmp_path / 'generic'}, " in error_of(load_dataset, tmp_path)
