from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.core.config import Settings, format_validation_error
from app.core.crypto import Keyring


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]


def errors_of(**values: object) -> list[str]:
    with pytest.raises(ValidationError) as info:
        settings(**values)
    return format_validation_error(info.value)


class TestSettings:
    def test_production_refuses_to_start_without_encryption_keys(self) -> None:
        lines = errors_of(dev=False)
        assert any("TOKENVEND_ENCRYPTION_KEYS is required outside dev mode" in x for x in lines)

    def test_dev_mode_starts_without_keys(self) -> None:
        assert settings(dev=True).dev

    def test_one_line_per_bad_value_naming_the_variable(self) -> None:
        lines = errors_of(
            encryption_keys=Keyring.generate_spec("k"),
            expiry_margin_seconds=-1,
            log_format="xml",
            phrase_eu_url="not a url",
        )
        names = sorted(line.split(":")[0] for line in lines)
        assert names == [
            "TOKENVEND_EXPIRY_MARGIN_SECONDS",
            "TOKENVEND_LOG_FORMAT",
            "TOKENVEND_PHRASE_EU_URL",
        ]

    def test_a_bad_key_is_reported_without_echoing_it(self) -> None:
        secretish = "k1:c2VjcmV0LXNlY3JldC1zZWNyZXQ="
        lines = errors_of(encryption_keys=secretish)
        assert lines[0].startswith("TOKENVEND_ENCRYPTION_KEYS:")
        assert "c2VjcmV0" not in "\n".join(lines)

    def test_secrets_do_not_show_in_repr(self) -> None:
        spec = Keyring.generate_spec("k")
        s = settings(encryption_keys=spec, redis_url="redis://:hunter2@localhost:6379/0")
        assert spec.split(":")[1] not in repr(s)
        assert "hunter2" not in repr(s)

    def test_environment_variables_are_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TOKENVEND_ENCRYPTION_KEYS", Keyring.generate_spec("envkey"))
        monkeypatch.setenv("TOKENVEND_DEFAULT_MIN_TTL_SECONDS", "42")
        s = settings()
        assert s.default_min_ttl_seconds == 42
        assert s.keyring.primary_id == "envkey"
