"""The one text template that turns an item's title and fields into the text we embed.

Offline (catalog -> content vectors -> SIDs) and the service (POST /v1/items -> content vector
-> SID) must build byte-identical text for the same item, otherwise a re-ingested item would
get a different SID from the one it was built with. So both call `item_text` and nothing else.

Example:
    item_text("Toy Story", {"year": "1995", "genres": "Animation, Comedy",
                            "director": "John Lasseter", "plot": "A cowboy ..."})
    -> "Toy Story (1995). Genres: Animation, Comedy. Director: John Lasseter. Plot: A cowboy ..."
"""

from __future__ import annotations

import re

# Short, descriptive fields first, in this order. Keys are matched case-insensitively and the
# aliases of one concept share a label, so "Genre" and "genres" both read "Genres: ...".
HEAD_FIELDS: list[tuple[str, tuple[str, ...]]] = [
    ("Genres", ("genres", "genre")),
    ("Director", ("director", "directors")),
    ("Writer", ("writer", "writers")),
    ("Cast", ("cast", "actors", "stars")),
]
# Long free text goes last, after the other fields: the content encoder truncates at 256
# tokens, and a long plot should be what gets cut, not the short fields behind it.
TAIL_FIELDS: list[tuple[str, tuple[str, ...]]] = [
    ("Plot", ("plot", "overview", "synopsis")),
    ("Description", ("description", "summary")),
    ("Text", ("text",)),
]
YEAR_KEYS = ("year",)
# Keys that never describe the item's content (the title is passed separately).
SKIP_KEYS = {"title", "id", "item_id"}
_URL_KEY = re.compile(r"(^|_)(url|uri|link|poster|image|img|thumbnail)s?($|_)")
_URL_VALUE = re.compile(r"^(https?://|www\.|ftp://|data:)", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def _clean(value: str) -> str:
    return _SPACE.sub(" ", str(value)).strip()


def _is_url_like(key: str, value: str) -> bool:
    return bool(_URL_KEY.search(key) or _URL_VALUE.match(value))


def _sentence(label: str, value: str) -> str:
    # Our own separator is ". "; a value that already ends a sentence keeps its punctuation.
    return f"{label}: {value}" if value[-1] in ".!?" else f"{label}: {value}."


def item_text(title: str, fields: dict[str, str]) -> str:
    """Deterministic text for one item: title (year). head fields. other fields. long text.

    Empty fields and URL-like fields (poster, imdb url, ...) are skipped; the order does not
    depend on the dict's insertion order; whitespace is collapsed.
    """
    values: dict[str, str] = {}
    # Sorted by the raw key so that when two keys normalise alike ("Genre", "genre") the
    # one kept never depends on the dict's insertion order.
    for key, value in sorted(fields.items()):
        k = _clean(key).lower().replace(" ", "_").replace("-", "_")
        v = _clean(value) if value is not None else ""
        if v and k not in SKIP_KEYS and k not in values and not _is_url_like(k, v):
            values[k] = v
    for k in ("genres", "genre"):
        # Some sources write "Animation|Comedy"; embed it like a human list.
        if k in values:
            values[k] = ", ".join(g.strip() for g in values[k].split("|") if g.strip())

    head = _clean(title)
    year = next((values.pop(k) for k in YEAR_KEYS if k in values), "")
    # ML titles already carry the year ("Toy Story (1995)"): don't print it twice.
    if year and f"({year})" not in head:
        head = f"{head} ({year})" if head else year
    parts = [head if not head or head[-1] in ".!?" else head + "."] if head else []

    def take(groups: list[tuple[str, tuple[str, ...]]]) -> list[str]:
        out = []
        for label, aliases in groups:
            found = [values.pop(a) for a in aliases if a in values]
            if found:
                out.append(_sentence(label, "; ".join(found)))
        return out

    head_parts = take(HEAD_FIELDS)
    tail_parts = take(TAIL_FIELDS)
    other_parts = [_sentence(k.replace("_", " ").capitalize(), values[k]) for k in sorted(values)]
    return " ".join(parts + head_parts + other_parts + tail_parts)
