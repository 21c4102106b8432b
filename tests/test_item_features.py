"""sidrec/item_features.py: the genres and years beside a content vector."""

from __future__ import annotations

import numpy as np
import pytest

from sidrec.item_features import YEAR_STEP, ItemFeatures, item_genres, item_year

CATALOG = [
    {"genres": "Comedy, Drama", "year": "1995"},
    {"Genre": "comedy|Horror", "year": "1999-2001"},
    {"genres": "Drama", "Year": "2001-11-22"},
    {"genres": "Western", "year": "n/a"},  # a genre of one item; no readable year
    {"plot": "no genre, no year"},
]


def test_fields_are_read_whatever_their_case_and_separator() -> None:
    assert item_genres(CATALOG[0]) == {"comedy", "drama"}
    assert item_genres(CATALOG[1]) == {"comedy", "horror"}
    assert item_genres(CATALOG[4]) == set()
    assert [item_year(f) for f in CATALOG] == [1995, 1999, 2001, None, None]


def test_fit_keeps_the_genres_of_two_items_and_the_catalogs_years() -> None:
    features = ItemFeatures.fit(CATALOG)
    assert features is not None
    assert features.genres == ("comedy", "drama")  # horror and western name one item each
    assert features.years == (1995, 2001)
    assert features.dim == 2 + len(np.arange(1995, 2001 + YEAR_STEP, YEAR_STEP))
    assert ItemFeatures.from_record(features.record()) == features
    # a part most items lack is left out; a catalog with neither part has no features
    assert ItemFeatures.fit([{"genres": "Drama"}, {"genres": "Drama"}, {}]).years == ()
    assert ItemFeatures.fit([{"text": "categories: Toys"}] * 3) is None
    assert ItemFeatures.fit([{"genres": "Drama", "year": "1990"}, {}, {}]) is None


def test_parts_are_unit_and_the_year_part_falls_with_the_gap() -> None:
    features = ItemFeatures(("comedy", "drama"), (1950, 2000))
    fields = [{"genres": "Comedy, Drama", "year": str(y)} for y in (1970, 1972, 1980, 1999)]
    parts = features.parts([*fields, {}])
    genre, year = parts[:, :2], parts[:, 2:]
    np.testing.assert_allclose(np.linalg.norm(genre[:4], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(year[:4], axis=1), 1.0, rtol=1e-6)
    assert not parts[4].any()  # an item without either gets zeros
    near, far, farthest = year[0] @ year[1], year[0] @ year[2], year[0] @ year[3]
    assert 1.0 > near > far > farthest
    # the content vector goes in at unit norm, before the parts
    content = np.array([[3.0, 4.0]], np.float32)
    extended = features.extend(content, fields[:1])
    assert extended.shape == (1, 2 + features.dim)
    np.testing.assert_allclose(extended[0, :2], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(extended[0, 2:], parts[0], rtol=1e-6)


@pytest.mark.parametrize(("year", "nearest_end"), [("1890", "1950"), ("2090", "2000")])
def test_a_year_outside_the_catalogs_range_reads_as_its_nearest_end(
    year: str, nearest_end: str
) -> None:
    features = ItemFeatures((), (1950, 2000))
    part, end = features.parts([{"year": year}, {"year": nearest_end}])
    assert np.linalg.norm(part) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(part, end)
