"""Logging: JSON lines in production, readable console output in development.

structlog renders records from the standard library too, so third-party loggers (uvicorn,
SQLAlchemy) come out in the same format, each line with the request id of the request it belongs to.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

import structlog

from app.core.config import LogFormat
from app.core.middleware import request_id_var


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
                        renderer,
                    ],
                    "foreign_pre_chain": pre_chain,
                }
            },
            "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "structured"}},
            "root": {"handlers": ["default"], "level": level.upper()},
            "loggers": {
                "uvicorn.error": {"level": level.upper()},
                "uvicorn.access": {"level": "WARNING" if level.upper() != "DEBUG" else "INFO"},
                "sqlalchemy": {"level": "WARNING"},
                "httpx": {"level": "WARNING"},
            },
        }
    )
