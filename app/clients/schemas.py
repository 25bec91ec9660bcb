from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints

from app.clients.models import Role
from app.core.schemas import SLUG_PATTERN, Schema

Grant = Annotated[str, StringConstraints(pattern=rf"{SLUG_PATTERN}|^\*$", max_length=63)]
Grants = Annotated[
    list[Grant],
    Field(
        max_length=100,
        description='Team slugs this client may vend for; `["*"]` for every team.',
        examples=[["acme"]],
    ),
]


RateLimit = Annotated[
    float | None,
    Field(gt=0, le=100_000, description="Requests per second; null: the service default."),
]


class ClientCreate(Schema):
    name: str = Field(min_length=1, max_length=100, examples=["billing-service"])
    role: Role = Role.CLIENT
    teams: Grants = Field(default_factory=list)
    rate_limit_per_second: RateLimit = None


class ClientUpdate(Schema):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"teams": ["acme", "globex"]}, {"disabled": True}]}
    )

    name: str | None = Field(None, min_length=1, max_length=100)
    role: Role | None = None
    teams: Grants | None = None
    disabled: bool | None = None
    rate_limit_per_second: RateLimit = None


class ClientRead(Schema):
    id: uuid.UUID
    name: str
    role: Role
    teams: list[str]
    key_id: str = Field(description="The public part of the client's API key.")
    disabled: bool
    rate_limit_per_second: float | None
    created_at: dt.datetime
    updated_at: dt.datetime
    last_used_at: dt.datetime | None


class ClientWithKey(Schema):
    client: ClientRead
    api_key: str = Field(
        description="The client's API key (`tvk_<key id>_<secret>`). Shown only in this response."
    )
