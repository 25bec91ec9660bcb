"""The OpenAPI document tells the truth and does not drift unnoticed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from app.cli import _SPEC_KEY
from app.core.config import Settings
from app.main import create_app

SNAPSHOT = Path(__file__).resolve().parents[2] / "openapi.json"
PUBLIC = {"/healthz", "/readyz", "/metrics", "/oauth/token"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    settings = Settings(_env_file=None, encryption_keys=SecretStr(_SPEC_KEY))  # type: ignore[call-arg]
    document: dict[str, Any] = create_app(settings).openapi()
    return document


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    ]


def test_the_committed_snapshot_matches_the_served_document(spec: dict[str, Any]) -> None:
    committed = json.loads(SNAPSHOT.read_text())
    assert committed == json.loads(json.dumps(spec)), (
        "openapi.json is out of date: review the change, then `tokenvend openapi > openapi.json`"
    )


def test_the_explorer_can_authorize_with_a_bearer_key(spec: dict[str, Any]) -> None:
    scheme = spec["components"]["securitySchemes"]["ClientKey"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    for method, path, op in operations(spec):
        if path not in PUBLIC:
            assert op.get("security") == [{"ClientKey": []}], f"{method} {path}"


def test_every_operation_is_described_tagged_and_named(spec: dict[str, Any]) -> None:
    ids = []
    for method, path, op in operations(spec):
        where = f"{method} {path}"
        assert op.get("summary"), where
        assert op.get("description"), where
        assert op.get("tags"), where
        assert op.get("operationId"), where
        ids.append(op["operationId"])
    assert len(ids) == len(set(ids))


def test_errors_are_documented_as_problems(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        if path in PUBLIC:
            continue
        errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
        assert {"401", "403", "422", "429"} <= set(errors), f"{method} {path}"
        for code, response in errors.items():
            content = response.get("content", {})
            assert "application/problem+json" in content, f"{method} {path} {code}"
            schema = content["application/problem+json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Problem"}, f"{method} {path} {code}"


def test_request_bodies_carry_examples(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    for method, path, op in operations(spec):
        body = op.get("requestBody")
        if body is None:
            continue
        for media in body["content"].values():
            ref = media.get("schema", {}).get("$ref", "")
            if not ref:
                assert media.get("examples") or media.get("example"), f"{method} {path}"
                continue
            schema = schemas[ref.rsplit("/", 1)[1]]
            has_example = "examples" in schema or any(
                "examples" in field or "example" in field
                for field in schema.get("properties", {}).values()
            )
            assert has_example, f"{method} {path}: no example in {ref}"
