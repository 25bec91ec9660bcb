from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)

router = APIRouter(tags=["health"])


def _registry() -> CollectorRegistry:
    """With several workers each process writes its samples to PROMETHEUS_MULTIPROC_DIR and any
    worker answers the scrape with the sum over all of them."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Text exposition"}},
)
async def metrics() -> Response:
    """Counters, histograms and gauges prefixed `tokenvend_`; no label carries a secret."""
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)
