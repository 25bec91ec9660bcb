from __future__ import annotations

import base64

import pytest

from app.core.crypto import DecryptionFailed, Keyring, Sealed


def spec(kid: str, byte: int) -> str:
    return f"{kid}:{base64.b64encode(bytes([byte]) * 32).decode()}"


class TestKeyringParse:
    def test_first_key_seals_and_every_key_opens(self) -> None:
        old = Keyring.parse(spec("old", 1))
        sealed_old = old.seal(b"secret", b"aad")
        ring = Keyring.parse(f"{spec('new', 2)}, {spec('old', 1)}")
        assert ring.primary_id == "new"
        assert ring.seal(b"x", b"a").key_id == "new"
        assert ring.open(sealed_old, b"aad") == b"secret"

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("", "no keys"),
            ("nokid", "expected `kid:base64-32-bytes`"),
            ("k1:not*base64", "not valid base64"),
            (f"k1:{base64.b64encode(b'short').decode()}", "must decode to 32 bytes"),
            (f"{spec('a', 1)},{spec('a', 2)}", "duplicate key id"),
            ("bad kid!:AAAA", "expected"),
        ],
    )
    def test_bad_specs_are_refused_with_a_clear_message(self, value: str, message: str) -> None:
        with pytest.raises(ValueError, match=message) as info:
            Keyring.parse(value)
        assert base64.b64encode(bytes([2]) * 32).decode() not in str(info.value)

    def test_repr_shows_no_key_material(self) -> None:
        material = base64.b64encode(bytes([7]) * 32).decode()
        ring = Keyring.parse(f"k:{material}")
        assert material not in repr(ring)
        assert "k" in repr(ring)

    def test_generated_spec_parses(self) -> None:
        assert Keyring.parse(Keyring.generate_spec("fresh")).primary_id == "fresh"


class TestSealing:
    ring = Keyring.parse(spec("k", 3))

    def test_round_trip_with_a_random_nonce(self) -> None:
        a, b = self.ring.seal(b"token", b"row-1"), self.ring.seal(b"token", b"row-1")
        assert a.blob != b.blob  # fresh nonce each time
        assert b"token" not in a.blob
        assert self.ring.open(a, b"row-1") == b"token"

    def test_ciphertext_moved_to_another_row_does_not_open(self) -> None:
        sealed = self.ring.seal(b"team-a-token", b"row-a")
        with pytest.raises(DecryptionFailed):
            self.ring.open(sealed, b"row-b")

    @pytest.mark.parametrize("index", [0, 11, 12, -1])
    def test_a_flipped_byte_does_not_open(self, index: int) -> None:
        sealed = self.ring.seal(b"token", b"row")
        blob = bytearray(sealed.blob)
        blob[index] ^= 0x01
        with pytest.raises(DecryptionFailed):
            self.ring.open(Sealed(sealed.key_id, bytes(blob)), b"row")

    def test_unknown_key_id_and_truncated_blob_do_not_open(self) -> None:
        sealed = self.ring.seal(b"token", b"row")
        with pytest.raises(DecryptionFailed):
            self.ring.open(Sealed("other", sealed.blob), b"row")
        with pytest.raises(DecryptionFailed):
            self.ring.open(Sealed("k", sealed.blob[:12]), b"row")
