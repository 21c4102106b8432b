"""Request and response bodies of the v1 API (pydantic). Unknown fields are rejected, so a typo
("itemid") is a 422 naming it rather than a silently ignored value."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

# Unix seconds up to the year ~36800: rules out milliseconds sent by mistake being read as
# dates 1000x in the future only loosely, but keeps int64 arithmetic in the model safe.
MAX_TS = 2**40
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The same rule as JSON Schema (ECMA regex) for the OpenAPI: no control characters.
ID_PATTERN = r"^[^\u0000-\u001f\u007f]+$"
ID_MAX_LENGTH = 256
MAX_VECTOR_ABS = 1e6
# A hard bound on a history override, checked while parsing (pydantic stops at the first item
# over it, so a 1 MiB list costs no more than a short one). The model's own max_len, usually
# far lower, is checked by the route and published in the OpenAPI (service/app.py).
MAX_HISTORY_OVERRIDE = 10_000
# recommend's exclude_items and filter: bounded so one request stays cheap to check.
MAX_EXCLUDE_ITEMS = 10_000
MAX_FILTER_FIELDS = 20
MAX_FILTER_VALUES = 1_000
# Ids sent as JSON numbers must be exact in every JSON parser (|n| < 2**53, what a double
# holds); a longer number id is sent as a string. The OpenAPI states the same bounds.
_SAFE_INT = (-(2**53 - 1), 2**53 - 1)


def _unicode(value: Any) -> Any:
    # JSON may carry lone surrogates ("\ud800"); they cannot be stored or encoded as UTF-8.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode (lone surrogate)") from None
    return value


def _json_int(value: Any) -> Any:
    # JSON has one number type: 7.0 is the integer 7 (JSON Schema agrees), 7.5 is not.
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


def _as_id(value: Any) -> Any:
    # ML-style ids are numbers in many clients' JSON; accept them, store them as text (the
    # OpenAPI says "string or integer", so 42 and "42" are one id).
    if isinstance(value, bool):
        raise ValueError("must be a string or an integer, not a boolean")
    value = _json_int(value)
    if isinstance(value, int):
        if not _SAFE_INT[0] <= value <= _SAFE_INT[1]:
            raise ValueError("an integer id must be below 2**53 in size; send it as a string")
        return str(value)
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return _unicode(value)


def id_schema(max_length: int) -> dict[str, Any]:
    """What _as_id accepts, as JSON Schema: a string without control characters, or an integer."""
    return {
        "anyOf": [
            {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": ID_PATTERN},
            {"type": "integer", "minimum": _SAFE_INT[0], "maximum": _SAFE_INT[1]},
        ]
    }


Id = Annotated[
    str,
    BeforeValidator(_as_id),
    Field(min_length=1, max_length=ID_MAX_LENGTH),
    WithJsonSchema(id_schema(ID_MAX_LENGTH)),
]
Text = Annotated[str, AfterValidator(_unicode)]
# The conversion is listed after the constraints so that it runs first and the JSON schema
# still shows them (minimum/maximum).
Timestamp = Annotated[int, Field(ge=0, le=MAX_TS, strict=True), BeforeValidator(_json_int)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A filter's value is text like an item's field value; numbers ({"year": [1995]}) as their text.
FilterValue = Annotated[
    str,
    BeforeValidator(
        lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
    ),
    AfterValidator(_unicode),
    Field(min_length=1, max_length=1_000),
    WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1}, {"type": "number"}]}),
]
FieldName = Annotated[Text, Field(min_length=1, max_length=200)]


class HistoryEvent(Strict):
    item_id: Id
    ts: Timestamp | None = None


class RecommendRequest(Strict):
    # The OpenAPI says what _someone checks: user_id or history, not both null.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["user_id"], "properties": {"user_id": {"not": {"type": "null"}}}},
                {"required": ["history"], "properties": {"history": {"not": {"type": "null"}}}},
            ]
        },
    )

    user_id: Id | None = None
    # At most SIDREC_MAX_K (the OpenAPI served by the app gives the configured maximum).
    k: Annotated[int, Field(ge=1, strict=True), BeforeValidator(_json_int)] = 10
    exclude_seen: Annotated[bool, Field(strict=True)] = True
    # Use this history instead of the stored one (oldest first): item ids or {item_id, ts}.
    # At most the model's max_len items (a 422 naming `history` beyond it, see the route).
    history: Annotated[list[Id | HistoryEvent], Field(max_length=MAX_HISTORY_OVERRIDE)] | None = (
        None
    )
    # The time the recommendation is for (unix s); default now. The model's time features
    # read it the way the offline evaluator reads the held-out item's timestamp.
    query_time: Timestamp | None = None
    # Items never to return (ids the catalog does not hold are ignored).
    exclude_items: Annotated[list[Id], Field(max_length=MAX_EXCLUDE_ITEMS)] = Field(
        default_factory=list
    )
    # Only items whose field equals one of the values listed, for every field named:
    # {"genres": ["Comedy", "Drama"]}. A field value that lists several ("Comedy|Drama",
    # "Animation, Comedy") matches any of them; compared ignoring case. An unknown field
    # name is a 422 naming it.
    filter: (
        Annotated[
            dict[
                FieldName,
                Annotated[list[FilterValue], Field(min_length=1, max_length=MAX_FILTER_VALUES)],
            ],
            Field(min_length=1, max_length=MAX_FILTER_FIELDS),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _someone(self) -> RecommendRequest:
        if self.user_id is None and self.history is None:
            raise ValueError("give user_id, or history for an anonymous request")
        return self


class ScoredItem(BaseModel):
    item_id: str
    score: float
    sid: list[int]


class RecommendResponse(BaseModel):
    user_id: str | None
    items: list[ScoredItem]
    # "popular" when the user had no usable history: items are the bundle's popularity list
    # and score is the item's number of training interactions.
    fallback: str | None
    history_len: int
    # True when fewer than k items qualify (after seen items, exclude_items and filter):
    # `items` then holds every one that does.
    fewer_than_k: bool
    model_version: str
    request_id: str


class SimilarResponse(BaseModel):
    item_id: str
    # Nearest items by the recommend score (the item's unit vector against every item row),
    # best first; the item itself and retired items never appear.
    items: list[ScoredItem]
    fewer_than_k: bool  # the catalog holds fewer than k other items
    model_version: str
    request_id: str


class RetiredResponse(BaseModel):
    item_id: str
    status: str  # "retired"
    request_id: str


class EventIn(Strict):
    user_id: Id
    item_id: Id
    ts: Timestamp | None = None
    # Same id again (within event_id_ttl_s) = a retry: acknowledged, stored once.
    event_id: (
        Annotated[
            str,
            BeforeValidator(_as_id),
            Field(min_length=1, max_length=128),
            WithJsonSchema(id_schema(128)),
        ]
        | None
    ) = None


class EventsResponse(BaseModel):
    accepted: int  # events received and stored (now or by an earlier try)
    duplicates: int  # of those, retries of an event_id already stored
    request_id: str


class UserErased(BaseModel):
    """What DELETE /v1/users/{user_id} removed; all zeros for a user the store did not know."""

    user_id: str
    history_events: int = Field(description="events the user's history held")
    event_ids: int = Field(description="remembered event_ids (for idempotent retries) removed")
    request_id: str


# A field's value is text; numbers ({"year": 1995}) are taken as their text.
FieldValue = Annotated[
    Text,
    BeforeValidator(
        lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
    ),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}]}),
]


class ItemIn(Strict):
    item_id: Id
    title: Annotated[Text, Field(max_length=2_000)] = ""
    # Free text about the item; embedded after title and fields (same template as offline).
    text: Annotated[Text, Field(max_length=100_000)] = ""
    fields: Annotated[
        dict[Annotated[Text, Field(max_length=200)], FieldValue], Field(max_length=100)
    ] = Field(default_factory=dict)
    # A precomputed content vector (the bundle's content model, e.g. 384 numbers) instead of text.
    # Each number within +-1e6: the vector is normalised anyway, and larger numbers overflow
    # the float32 arithmetic it goes through (1e308 became inf, then NaN: a garbage SID).
    # Strict: JSON numbers only, as the schema says (lax, true and "0.5" were taken as numbers).
    content_vector: (
        list[
            Annotated[
                float,
                Field(allow_inf_nan=False, ge=-MAX_VECTOR_ABS, le=MAX_VECTOR_ABS, strict=True),
            ]
        ]
        | None
    ) = None


def one_or_batch(model: type[BaseModel]) -> dict[str, Any]:
    """JSON Schema of a write body: one object, or a non-empty array of them. The routes parse
    these bodies themselves (batch size first, then the items), so the OpenAPI gets the
    schema this way. Both models are flat: their schemas have no $defs to place."""
    one = model.model_json_schema()
    return {"oneOf": [one, {"type": "array", "items": one, "minItems": 1}]}


class IngestedItem(BaseModel):
    item_id: str
    sid: list[int]
    collided: bool
    status: str  # "created" | "updated"


class ItemsResponse(BaseModel):
    items: list[IngestedItem]
    model_version: str
    request_id: str


class ErrorDetail(BaseModel):
    field: str
    problem: str


class ErrorResponse(BaseModel):
    error: str
    detail: str
    # The first MAX_ERRORS problems; errors_total counts them all.
    errors: list[ErrorDetail] = []
    errors_total: int = 0
    request_id: str | None = None


# Error bodies list at most this many problems, so a request naming 100,000 bad ids gets a
# small answer (detail names the first ones, errors_total says how many there were).
MAX_ERRORS = 50


class ReloadRequest(Strict):
    # None: SIDREC_BUNDLE, read again (point it, a symlink, at the new export first).
    bundle: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=4096,
                pattern=ID_PATTERN,
                description="bundle folder on the service's machine (absolute, or relative to "
                "its working directory); null or absent: SIDREC_BUNDLE's current target",
            ),
        ]
        | None
    ) = None


class ReloadResponse(BaseModel):
    status: str  # "reloaded", or "unchanged": this worker already serves that bundle
    model_version: str
    previous_version: str
    bundle: str  # the folder loaded, symlinks resolved
    seconds: float
    pid: int  # the worker that answered; the others follow within about a second
    request_id: str
