from __future__ import annotations

import datetime as dt

from pydantic import Field

from app.core.schemas import Schema, Slug


class TeamCreate(Schema):
    slug: Slug = Field(examples=["acme"])
    name: str | None = Field(None, min_length=1, max_length=200, examples=["ACME Localization"])


class TeamUpdate(Schema):
    name: str = Field(min_length=1, max_length=200, examples=["ACME Localization GmbH"])


class TeamRead(Schema):
    slug: str
    name: str
    created_at: dt.datetime
    updated_at: dt.datetime
