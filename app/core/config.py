"""Settings from `TOKENVEND_*` environment variables and an optional `.env` file."""

from __future__ import annotations

import enum
from functools import cached_property
from typing import Annotated

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.crypto import Keyring


class LogFormat(enum.StrEnum):
    JSON = "json"
    CONSOLE = "console"


class Region(enum.StrEnum):
    EU = "eu"
    US = "us"


Seconds = Annotated[float, Field(gt=0, le=300)]


class DatabaseSettings(BaseSettings):
    """The part of the settings that migrations need."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENVEND_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    database_url: SecretStr = Field(
        SecretStr("sqlite+aiosqlite:///./tokenvend.db"),
        description="SQLAlchemy async URL: postgresql+asyncpg://... or sqlite+aiosqlite:///path.",
    )


class Settings(DatabaseSettings):
    dev: bool = Field(False, description="Development mode (set by `tokenvend serve --dev`).")
    redis_url: SecretStr | None = Field(
        None, description="redis:// URL of the shared cache; empty for the in-process cache."
    )
    redis_prefix: str = Field("tokenvend:v1:", min_length=1, max_length=64)
    redis_cluster: bool = Field(
        False, description="TOKENVEND_REDIS_URL names a node of a Redis Cluster."
    )
    encryption_keys: SecretStr | None = Field(
        None, description="Comma-separated `kid:base64-32-bytes`; the first encrypts, all decrypt."
    )
    phrase_eu_url: AnyHttpUrl = AnyHttpUrl("https://eu.phrase.com/idm")
    phrase_us_url: AnyHttpUrl = AnyHttpUrl("https://us.phrase.com/idm")
    expiry_margin_seconds: int = Field(60, ge=0, le=3600)
    default_min_ttl_seconds: int = Field(300, ge=0, le=3600)
    upstream_connect_timeout_seconds: Seconds = 1.0
    upstream_timeout_seconds: Seconds = 5.0
    upstream_max_response_bytes: int = Field(64 * 1024, ge=1024, le=10 * 1024 * 1024)
    lock_ttl_seconds: Seconds = 10.0
    rejected_retry_seconds: int = Field(
        60, ge=0, le=86400, description="How long a rejected credential gets 424 without a retry."
    )
    request_deadline_seconds: Seconds = Field(
        8.0, description="Longest a vend may take, retries and waits for other exchanges included."
    )
    upstream_retries: int = Field(2, ge=0, le=10)
    upstream_backoff_base_seconds: Seconds = 0.2
    upstream_backoff_max_seconds: Seconds = 2.0
    retry_after_cap_seconds: Seconds = 5.0
    circuit_failure_threshold: int = Field(5, ge=1, le=1000)
    circuit_window_seconds: Seconds = 30.0
    circuit_cooldown_seconds: Seconds = 10.0
    refresh_fraction: float = Field(0.5, gt=0, lt=1)
    refresh_jitter: float = Field(0.1, ge=0, lt=0.5)
    refresh_window_seconds: int = Field(
        3600,
        ge=60,
        le=7 * 86400,
        description="Only credentials vended this recently are refreshed.",
    )
    refresh_interval_seconds: Seconds = 1.0
    webhook_url: AnyHttpUrl | None = None
    webhook_secret: SecretStr | None = None
    rate_limit_per_second: float = Field(
        1000.0, gt=0, le=1_000_000, description="Default per client key; a client may override it."
    )
    rate_limit_burst: int = Field(2000, ge=1, le=10_000_000)
    db_timeout_seconds: Seconds = 1.0
    redis_timeout_seconds: Seconds = 0.5
    redis_max_connections: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Redis connections per worker; beyond them a command waits (up to the timeout)",
    )
    bootstrap_admin_key: SecretStr | None = None
    docs_enabled: bool = True
    max_body_bytes: int = Field(65536, ge=1024, le=10 * 1024 * 1024)
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed by CORS (JSON list); empty: no CORS headers, browsers refuse.",
    )
    metrics_enabled: bool = Field(True, description="Serve /metrics (unauthenticated).")
    log_level: str = Field("INFO", pattern=r"^(?i:debug|info|warning|error|critical)$")
    log_format: LogFormat = LogFormat.JSON
    access_log: bool = Field(True, description="One log line per request (route template only).")

    @field_validator(
        "redis_url",
        "encryption_keys",
        "bootstrap_admin_key",
        "webhook_url",
        "webhook_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("encryption_keys")
    @classmethod
    def _keys_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            Keyring.parse(value.get_secret_value())  # raises ValueError with a message, no key
        return value

    @field_validator("bootstrap_admin_key")
    @classmethod
    def _key_format(cls, value: SecretStr | None) -> SecretStr | None:
        from app.auth.keys import parse_key_id

        if value is not None and parse_key_id(value.get_secret_value()) is None:
            raise ValueError("must be a client key `tvk_<16 hex>_<43 url-safe characters>`")
        return value

    @model_validator(mode="after")
    def _webhook_needs_secret(self) -> Settings:
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError("TOKENVEND_WEBHOOK_SECRET is required with TOKENVEND_WEBHOOK_URL")
        return self

    @model_validator(mode="after")
    def _production_needs_keys(self) -> Settings:
        if not self.dev and self.encryption_keys is None:
            raise ValueError(
                "TOKENVEND_ENCRYPTION_KEYS is required outside dev mode "
                "(generate one with `tokenvend keys generate`)"
            )
        return self

    @cached_property
    def keyring(self) -> Keyring:
        assert self.encryption_keys is not None, "dev mode fills encryption_keys before use"
        return Keyring.parse(self.encryption_keys.get_secret_value())

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.get_secret_value().startswith("sqlite")

    def phrase_url(self, region: Region) -> str:
        url = self.phrase_eu_url if region is Region.EU else self.phrase_us_url
        return str(url).rstrip("/")


def format_validation_error(exc: Exception) -> list[str]:
    """One line per bad value, naming the environment variable and never echoing its value."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return [str(exc)]
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in error["loc"])
        msg = error["msg"].removeprefix("Value error, ")
        # Checks across fields name their variables in the message itself.
        lines.append(f"TOKENVEND_{loc.upper()}: {msg}" if loc else msg)
    return lines
