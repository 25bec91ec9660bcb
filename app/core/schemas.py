"""Schema building blocks shared by every domain."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

T = TypeVar("T")

SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN, max_length=63)]
MAX_PAGE = 100


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True, extra="forbid")


class Page(BaseModel, Generic[T]):
    items: list[T]
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last page.")

    @classmethod
    def of(cls, items: list[T], *, limit: int, offset: int) -> Page[T]:
        # Callers fetch limit + 1 rows: the extra row says whether another page exists.
        more = len(items) > limit
        return cls(
            items=items[:limit],
            limit=limit,
            offset=offset,
            next_offset=offset + limit if more else None,
        )
