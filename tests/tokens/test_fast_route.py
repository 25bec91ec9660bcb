"""The token route's fast path (`app.tokens.router.VendRoute`) accepts exactly what the declared
endpoint accepts, with the same values, and answers the same as the declared handler."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.dependencies.utils import request_params_to_args
from fastapi.routing import APIRoute
from fastapi.security.utils import get_authorization_scheme_param
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from app.main import create_app
from app.tokens.router import VendRoute, _well_formed
from tests.conftest import Api, make_settings

PATH = "/v1/teams/{team}/token"


def _declared_route() -> APIRoute:
    from tests.security.test_inventory import inventory

    for entry in inventory(create_app(make_settings())):
        if entry.path == PATH and "GET" in entry.methods:
            assert isinstance(entry.route, VendRoute)
            return entry.route
    raise AssertionError("no token route")


ROUTE = _declared_route()
HEX = "0123456789abcdefABCDEF"
texts = st.one_of(
    st.sampled_from(["default", "acme", "a", "a-b", "A", "-a", "a_b", "", " 1", "1 ", "+5", "٣"]),
    st.from_regex(r"[a-z0-9][a-z0-9-]{0,70}", fullmatch=True),
    st.integers(-5, 5000).map(str),
    st.text(HEX, min_size=62, max_size=66),
    st.text(max_size=8),
)
params = st.lists(
    st.tuples(st.sampled_from(["credential", "min_ttl", "rejected_sha256", "other"]), texts),
    max_size=4,
)
authorization = st.one_of(
    st.none(),
    st.sampled_from(["Bearer tvk_a_b", "bearer  tvk_a_b ", "Basic x", "Bearer", "Bearer ", "x"]),
    st.text(max_size=12),
)


def _request(team: str, query: list[tuple[str, str]], auth: str | None) -> Request:
    from urllib.parse import urlencode

    headers = [] if auth is None else [(b"authorization", auth.encode("latin-1", "replace"))]
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": PATH.format(team=team),
            "query_string": urlencode(query).encode(),
            "headers": headers,
            "path_params": {"team": team},
        }
    )


def _declared(request: Request) -> tuple[dict[str, Any], list[Any], str]:
    """What FastAPI makes of the request by the route's declaration: values, errors, bearer key."""
    dependant = ROUTE.dependant
    query, errors = request_params_to_args(dependant.query_params, request.query_params)
    path, path_errors = request_params_to_args(dependant.path_params, request.path_params)
    scheme, key = get_authorization_scheme_param(request.headers.get("authorization"))
    return {**query, **path}, errors + path_errors, key if scheme.lower() == "bearer" else ""


@settings(max_examples=400, deadline=None)
@given(team=texts, query=params, auth=authorization)
@example(team="acme", query=[], auth="Bearer tvk_a_b")
@example(team="acme", query=[("min_ttl", "0007")], auth="Bearer tvk_a_b")
@example(team="acme", query=[("min_ttl", "3601")], auth="Bearer tvk_a_b")
@example(team="acme\n", query=[], auth="Bearer tvk_a_b")
def test_fast_path_takes_only_what_the_declaration_accepts(
    team: str, query: list[tuple[str, str]], auth: str | None
) -> None:
    request = _request(team, query, auth)
    fast = _well_formed(request)
    values, errors, key = _declared(request)
    known = [name for name, _ in query if name != "other"]
    if fast is None:
        # Declined: the declared handler answers. Only for input it refuses, a missing key, or
        # a parameter given twice; normal traffic must not miss the fast path.
        assert errors or not key or len(known) != len(set(known))
        return
    assert not errors
    assert fast.key == key
    assert fast.team == values["team"]
    assert fast.credential == values["credential"]
    assert fast.min_ttl == values["min_ttl"]
    assert fast.rejected_sha256 == values["rejected_sha256"]


def _same(a: httpx.Response, b: httpx.Response) -> None:
    assert a.status_code == b.status_code
    for body in (a, b):
        assert body.headers["content-type"] in ("application/json", "application/problem+json")
    strip = {"request_id", "expires_in"}
    assert {k: v for k, v in a.json().items() if k not in strip} == {
        k: v for k, v in b.json().items() if k not in strip
    }
    volatile = {"x-request-id", "content-length", "date"}
    assert {k: v for k, v in a.headers.items() if k not in volatile} == {
        k: v for k, v in b.headers.items() if k not in volatile
    }


async def test_both_paths_answer_alike(
    http: httpx.AsyncClient, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    await api.team("acme")
    await api.team("other")
    await api.credential("acme")
    _, granted = await api.client(["acme"])
    cases = [
        ("/v1/teams/acme/token", granted),  # 200 (a miss, then hits)
        ("/v1/teams/acme/token", granted),
        ("/v1/teams/other/token", granted),  # 403 not granted
        ("/v1/teams/acme/token?credential=nope", granted),  # 404
        ("/v1/teams/acme/token", {"Authorization": "Bearer tvk_0123456789abcdef_x"}),  # 401
    ]
    taken: list[bool] = []
    real = _well_formed

    def spy(request: Request) -> Any:
        taken.append(real(request) is not None)
        return real(request)

    monkeypatch.setattr("app.tokens.router._well_formed", spy)
    for url, headers in cases:
        fast = await http.get(url, headers=headers)
        # A parameter given twice is not for the fast path: the declared handler answers.
        sep = "&" if "?" in url else "?"
        declared = await http.get(f"{url}{sep}min_ttl=60&min_ttl=60", headers=headers)
        fast_again = await http.get(f"{url}{sep}min_ttl=60", headers=headers)
        _same(fast_again, declared)
        assert fast.status_code == declared.status_code
    assert taken == [True, False, True] * len(cases)


def test_the_parsed_request_keeps_the_client_key_out_of_its_repr() -> None:
    key = "tvk_0123456789abcdef_" + "s" * 43
    parsed = _well_formed(_request("acme", [("min_ttl", "60")], f"Bearer {key}"))
    assert parsed is not None
    assert parsed.key == key
    assert key not in repr(parsed)
    assert "acme" in repr(parsed)
