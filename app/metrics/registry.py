"""Every Prometheus metric tokenvend exports, in one place. Names carry the `tokenvend_` prefix.

Labels are bounded sets only: route templates (never raw paths), regions, outcomes. No label ever
carries a token, a key, a team slug or a client id.

With several uvicorn workers, prometheus-client's multiprocess mode aggregates the workers' values
(`PROMETHEUS_MULTIPROC_DIR`, set by `tokenvend serve`); gauges then declare how they combine.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "tokenvend_http_requests_total",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
)
REQUEST_DURATION = Histogram(
    "tokenvend_http_request_duration_seconds",
    "HTTP request latency by route template.",
    ["route", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
VENDS = Counter(
    "tokenvend_vends_total",
    "Token vends by outcome: hit, miss, stale (served from the in-process cache while the shared "
    "cache was unavailable) or error.",
    ["outcome"],
)
EXCHANGES = Counter(
    "tokenvend_upstream_exchanges_total",
    "Token exchanges at the Phrase IdM by region and result "
    "(ok, rejected, unavailable, timeout, bad_response).",
    ["region", "result"],
)
EXCHANGE_DURATION = Histogram(
    "tokenvend_upstream_exchange_duration_seconds",
    "Latency of token exchanges at the Phrase IdM.",
    ["region"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINGLE_FLIGHT_WAITS = Counter(
    "tokenvend_singleflight_waits_total",
    "Requests that waited for another request's or replica's exchange instead of exchanging.",
    ["scope"],
)
REFRESHER_RUNS = Counter(
    "tokenvend_refresher_runs_total",
    "Proactive refresher ticks by result (ok, error, not_leader).",
    ["result"],
)
REFRESHES = Counter(
    "tokenvend_refreshes_total",
    "Proactive refreshes of cached JWTs by result (ok, error).",
    ["result"],
)
REFRESHER_LAG = Gauge(
    "tokenvend_refresher_lag_seconds",
    "How late the most overdue refresh was at the last tick (0 when none was due).",
    multiprocess_mode="livemax",
)
JWT_MIN_REMAINING = Gauge(
    "tokenvend_cached_jwt_min_remaining_seconds",
    "Remaining life of the shortest-lived cached JWT among recently vended credentials.",
    multiprocess_mode="livemin",
)
CIRCUIT_STATE = Gauge(
    "tokenvend_circuit_state",
    "Upstream circuit breaker per region: 0 closed, 1 half-open, 2 open.",
    ["region"],
    multiprocess_mode="livemax",
)
CACHE_FALLBACKS = Counter(
    "tokenvend_cache_fallbacks_total",
    "Cache operations that fell back to the in-process cache because Redis failed.",
    ["operation"],
)
CREDENTIALS_REJECTED = Counter(
    "tokenvend_credential_rejections_total",
    "Credentials whose API token the Phrase IdM rejected (status changed to rejected).",
    ["region"],
)
AUDIT_PENDING = Gauge(
    "tokenvend_audit_pending_events",
    "Audit events buffered and not yet written.",
    multiprocess_mode="livesum",
)


# Label combinations exist at zero from the start, so `increase()` sees the first event too (a
# counter that appears already at 1 would hide it) and dashboards show every series.
for _region in ("eu", "us"):
    for _result in ("ok", "rejected", "unavailable", "timeout", "bad_response"):
        EXCHANGES.labels(_region, _result)
    CREDENTIALS_REJECTED.labels(_region)
    CIRCUIT_STATE.labels(_region).set(0)
for _outcome in ("hit", "miss", "stale", "error"):
    VENDS.labels(_outcome)
