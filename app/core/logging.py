"""Logging: JSON lines in production, readable console output in development.

structlog renders records from the standard library too, so third-party loggers (uvicorn,
SQLAlchemy) come out in the same format. Every line carries the request id of the request it
belongs to. Our own messages are written `event.name key=value ...` and split into an `event`
field and structured fields. A redaction step is the last line of defence: anything shaped like a
client key, a JWT or a bearer credential is masked before a line is written, wherever it came from.
"""

from __future__ import annotations

import hashlib
import logging
import logging.config
import re
from typing import Any

import structlog

from app.core.config import LogFormat
from app.core.middleware import request_id_var

_EVENT = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)((?: [a-z_]+=\S*)*)$")
_FIELD = re.compile(r" ([a-z_]+)=(\S*)")

_CLIENT_KEY = re.compile(r"tvk_([0-9a-f]{16})_[A-Za-z0-9_-]{20,}")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def _mask_jwt(match: re.Match[str]) -> str:
    return f"<jwt sha256:{hashlib.sha256(match.group(0).encode()).hexdigest()[:16]}>"


def redact(text: str) -> str:
    text = _CLIENT_KEY.sub(r"tvk_\1_<redacted>", text)
    text = _JWT.sub(_mask_jwt, text)
    return _BEARER.sub(r"\1 <redacted>", text)


def _redact_event(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for name, value in event.items():
        if isinstance(value, str):
            event[name] = redact(value)
    return event


def _split_event(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    message = event.get("event")
    if isinstance(message, str) and (match := _EVENT.match(message)):
        event["event"] = match.group(1)
        for key, value in _FIELD.findall(match.group(2)):
            event.setdefault(key, value)
    return event


def _add_request_id(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    rid = request_id_var.get()
    if rid is not None:
        event.setdefault("request_id", rid)
    return event


def configure_logging(level: str, fmt: LogFormat) -> None:
    pre_chain: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_request_id,
        _split_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt is LogFormat.JSON
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structured": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "processors": [
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        _redact_event,
                        renderer,
                    ],
                    "foreign_pre_chain": pre_chain,
                }
            },
            "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "structured"}},
            "root": {"handlers": ["default"], "level": level.upper()},
            "loggers": {
                "uvicorn.error": {"level": level.upper()},
                # Our own access log (app.access) names route templates, not raw paths.
                "uvicorn.access": {"level": "WARNING"},
                "sqlalchemy": {"level": "WARNING"},
                "httpx": {"level": "WARNING"},
                "httpcore": {"level": "WARNING"},
            },
        }
    )
