"""Expiry and cache TTL derivation as properties over expires_in, exp claims and clock offsets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from jose import jwt as jose_jwt

from app.tokens.broker import cache_ttl, expiry_of

NOW = 1_800_000_000.0


def token_with_exp(exp: int | None) -> str:
    claims = {"sub": "x"} if exp is None else {"sub": "x", "exp": exp}
    return jose_jwt.encode(claims, "k" * 32, algorithm="HS256")


# No deadline: the first example pays for python-jose's lazy imports.
@settings(deadline=None)
@given(
    expires_in=st.integers(min_value=1, max_value=86400),
    skew=st.integers(min_value=-7200, max_value=7200),
    has_exp=st.booleans(),
    margin=st.integers(min_value=0, max_value=3600),
    elapsed=st.floats(min_value=0, max_value=10),
)
def test_expiry_is_the_earlier_of_expires_in_and_exp_and_the_ttl_ends_a_margin_before(
    expires_in: int, skew: int, has_exp: bool, margin: int, elapsed: float
) -> None:
    # The upstream's clock may be off by `skew`: its exp claim then disagrees with expires_in.
    exp = int(NOW + expires_in + skew) if has_exp else None
    expires_at = expiry_of(token_with_exp(exp), NOW, expires_in)

    assert expires_at <= NOW + expires_in
    if exp is not None:
        assert expires_at <= exp
        assert expires_at == min(NOW + expires_in, exp)
    ttl = cache_ttl(expires_at, margin, NOW + elapsed)
    assert ttl <= expires_at - margin - NOW  # never cached past expires_at - margin
    assert NOW + elapsed + ttl <= expires_at - margin + 1e-6


@settings(deadline=None)
@given(st.text(max_size=50))
def test_an_unreadable_token_falls_back_to_expires_in(garbage: str) -> None:
    assert expiry_of(garbage, NOW, 100) == NOW + 100
