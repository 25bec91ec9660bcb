from __future__ import annotations

import json
import logging

import pytest

from app.auth.keys import issue_key
from app.core.config import LogFormat
from app.core.logging import configure_logging, redact

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


class TestRedaction:
    def test_client_keys_keep_only_their_public_id(self) -> None:
        key = issue_key()
        text = redact(f"auth failed for {key.key.get_secret_value()}")
        assert key.key.get_secret_value() not in text
        assert f"tvk_{key.key_id}_<redacted>" in text

    def test_jwts_become_a_fingerprint(self) -> None:
        text = redact(f"got {JWT} back")
        assert JWT not in text
        assert "<jwt sha256:" in text

    @pytest.mark.parametrize("header", ["Bearer abcdefghijkl", "basic dXNlcjpwYXNzd29yZA=="])
    def test_authorization_values_are_masked(self, header: str) -> None:
        assert header.split()[1] not in redact(f"Authorization: {header}")


class TestJsonLines:
    def test_dotted_events_become_structured_fields_and_secrets_are_masked(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging("INFO", LogFormat.JSON)
        try:
            logging.getLogger("app.test").info("token.vend.miss team=%s jwt=%s", "acme", JWT)
            line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        finally:
            logging.getLogger().handlers.clear()
        assert line["event"] == "token.vend.miss"
        assert line["team"] == "acme"
        assert line["level"] == "info"
        assert JWT not in json.dumps(line)
