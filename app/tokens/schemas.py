from __future__ import annotations

import datetime as dt
from typing import Final, Literal

from pydantic import BaseModel, Field

from app.core.config import Region

ISSUED_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"
# On every response that carries a JWT (RFC 6749 5.1).
NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class TokenResponse(BaseModel):
    access_token: str = Field(
        description="The Phrase JWT.", examples=["eyJhbGciOiJSUzI1NiJ9.e30.c2ln"]
    )
    token_type: Literal["Bearer"] = "Bearer"
    issued_token_type: Literal["urn:ietf:params:oauth:token-type:access_token"] = ISSUED_TOKEN_TYPE
    expires_in: int = Field(
        description="Seconds of life left at the time of the response.", examples=[13950]
    )
    expires_at: dt.datetime = Field(examples=["2026-11-29T09:12:31Z"])
    team: str = Field(examples=["acme"])
    credential: str = Field(examples=["default"])
    region: Region
    cache: Literal["hit", "miss"] = Field(description="Whether the JWT came from the cache.")


class EvictResponse(BaseModel):
    team: str
    credential: str
    evicted: bool = Field(description="Whether a cached JWT was there to evict.")
