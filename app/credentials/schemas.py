from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated

from pydantic import ConfigDict, Field, SecretStr

from app.core.config import Region
from app.core.schemas import Schema, Slug
from app.credentials.models import CredentialStatus

ApiToken = Annotated[
    SecretStr,
    Field(
        min_length=16,
        max_length=4096,
        description="The Phrase Platform API token. Write-only: never returned.",
        examples=["phrdev_demo_token_0001"],
    ),
]


class CredentialCreate(Schema):
    name: Slug = Field("default", examples=["default"])
    region: Region = Field(examples=["eu"])
    api_token: ApiToken
    product: str | None = Field(None, min_length=1, max_length=63, examples=["strings"])
    expires_on: dt.date | None = Field(None, description="When the API token expires (730 days).")


class SettableStatus(enum.StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class CredentialUpdate(Schema):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "disabled"}]})

    status: SettableStatus | None = Field(
        None, description="`disabled` stops vending; `active` re-enables (and clears a rejection)."
    )
    product: str | None = Field(None, min_length=1, max_length=63)
    expires_on: dt.date | None = None


class ApiTokenRotate(Schema):
    api_token: ApiToken
    expires_on: dt.date | None = None


class LastError(Schema):
    code: str
    at: dt.datetime


class CredentialRead(Schema):
    team: str
    name: str
    region: Region
    product: str | None
    api_token_hint: str = Field(description="The API token's last 4 characters.")
    status: CredentialStatus
    version: int = Field(description="Bumped on every rotation.")
    last_exchange_at: dt.datetime | None
    last_error: LastError | None
    expires_on: dt.date | None
    jwt_cached: bool
    jwt_expires_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
