from __future__ import annotations

import base64

from app.auth import keys


class TestClientKeys:
    def test_format_and_at_least_256_random_bits(self) -> None:
        issued = keys.issue_key()
        key = issued.key.get_secret_value()
        prefix, key_id, secret = key.split("_", 2)
        assert prefix == "tvk"
        assert key_id == issued.key_id
        assert len(base64.urlsafe_b64decode(secret + "=")) * 8 >= 256

    def test_keys_are_unique_and_only_the_digest_is_kept(self) -> None:
        a, b = keys.issue_key(), keys.issue_key()
        assert a.key_id != b.key_id
        assert a.digest != b.digest
        assert a.key.get_secret_value() not in a.digest
        assert "tvk_" not in repr(a)

    def test_verify_accepts_the_key_and_refuses_any_other(self) -> None:
        issued = keys.issue_key()
        key = issued.key.get_secret_value()
        assert keys.verify(key, issued.digest)
        assert not keys.verify(key[:-1] + ("A" if key[-1] != "A" else "B"), issued.digest)

    def test_parse_key_id_refuses_malformed_keys(self) -> None:
        issued = keys.issue_key()
        assert keys.parse_key_id(issued.key.get_secret_value()) == issued.key_id
        for bad in ["", "tvk_", "Bearer x", "tvk_XYZ_abc", issued.key.get_secret_value() + "x"]:
            assert keys.parse_key_id(bad) is None
