"""The final tables: figures per target, the ratios, and each of issue 6's targets PASS or FAIL."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_WARM = {
    "cache": "JWTs stored through RedisCache",
    "exchange": "JWTs exchanged at the dev IdM",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    target: str
    figure: str
    bar: str
    ok: bool | None  # None: not measured in this run, or the measurement is invalid

    @property
    def label(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.ok]


def _x(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}x"


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []
    cached = results.get("cached")
    if cached and "ratio_rps" in cached:
        valid = cached["median"]["reference"]["valid"] and cached["median"]["tokenvend-w1"]["valid"]
        rps, p99 = cached["ratio_rps"]["median"], cached["ratio_p99"]["median"]
        out.append(
            Verdict(
                "cached vend, 1 worker: throughput vs reference",
                _x(rps),
                ">= 1.00x",
                rps >= 1.0 if valid else None,
            )
        )
        out.append(
            Verdict(
                "cached vend, 1 worker: p99 vs reference",
                _x(p99),
                "<= 1.50x",
                p99 <= 1.5 if valid else None,
            )
        )
    if cached and "workers_ratio_rps" in cached:
        ratio = cached["workers_ratio_rps"]["median"]
        valid = cached["median"]["tokenvend-w2"]["valid"]
        machine = cached.get("reference_workers_ratio_rps")
        out.append(
            Verdict(
                "cached vend: 2 workers vs 1 worker throughput",
                _x(ratio) + (f" (reference {_x(machine['median'])})" if machine else ""),
                ">= 1.60x",
                ratio >= 1.6 if valid else None,
            )
        )
    cold = results.get("cold")
    if cold:
        out.append(
            Verdict(
                "cold path: exchanges for "
                f"{cold['credentials']} credentials x {cold['requests'] // cold['credentials']}",
                str(cold["exchanges"]),
                f"== {cold['credentials']}",
                cold["exchanges"] == cold["credentials"],
            )
        )
        all_ok = cold["statuses"] == {"200": cold["requests"]}
        out.append(
            Verdict(
                f"cold path: all {cold['requests']} answered 200 within",
                f"{cold['all_answered_s']:.3f} s"
                + ("" if all_ok else f" (statuses {cold['statuses']})"),
                f"<= {cold['bar_s']:.3f} s",
                all_ok and cold["all_answered_s"] <= cold["bar_s"],
            )
        )
    scale = results.get("scale")
    if scale:
        n = scale["credentials"]
        ratio = scale["ratio_rps"]["median"]
        valid = all(m["valid"] for m in scale["median"].values())
        out.append(
            Verdict(
                f"{n:,} cached credentials: throughput vs 1 credential",
                _x(ratio),
                ">= 0.90x",
                ratio >= 0.9 if valid else None,
            )
        )
        rss = [mb for server in scale["rss_mb"].values() for mb in server.values()]
        out.append(
            Verdict(
                f"{n:,} cached credentials: resident memory per worker (max)",
                f"{max(rss):.1f} MB",
                "< 150 MB",
                max(rss) < 150,
            )
        )
    return out


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line.format(*header), rule, *(line.format(*r) for r in rows)])


def _load_rows(summary: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [
        [
            name,
            f"{m['rps']:,.0f}",
            f"{m['p50_ms']:.2f}",
            f"{m['p99_ms']:.2f}",
            f"{m.get('cpu_us_per_request', float('nan')):.0f}",
            f"{m.get('machine_busy_pct', float('nan')):.0f} %",
            f"{m.get('db_tx_per_1k', float('nan')):.1f}",
            "yes" if m["valid"] else "NO (non-2xx or errors)",
        ]
        for name, m in summary.items()
    ]


def render(results: dict[str, Any]) -> str:
    parts: list[str] = []
    meta = results["meta"]
    parts.append(
        f"tokenvend benchmark  loadgen={meta['loadgen']}  connections={meta['connections']}  "
        f"rounds={meta['rounds']} x {meta['duration_s']:g} s  cpus={meta['cpus']}  "
        f"mode={'quick' if meta['quick'] else 'full'}"
    )
    header = [
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "cpu us/req",
        "machine busy",
        "db tx/1k req",
        "valid",
    ]
    cached = results.get("cached")
    if cached:
        parts.append(
            "\nCached vend (median over rounds)\n" + _table(_load_rows(cached["median"]), header)
        )
        ratios = []
        for key, label in (
            ("ratio_rps", "throughput tokenvend-w1 / reference"),
            ("ratio_p50", "p50 tokenvend-w1 / reference"),
            ("ratio_p99", "p99 tokenvend-w1 / reference"),
            ("ratio_cpu", "server CPU per request tokenvend-w1 / reference"),
            ("workers_ratio_rps", "throughput tokenvend-w2 / tokenvend-w1"),
            ("reference_workers_ratio_rps", "throughput reference-w2 / reference (the machine)"),
            ("ratio_rps_w2", "throughput tokenvend-w2 / reference-w2"),
        ):
            if key in cached:
                per_round = " ".join(f"{v:.2f}" for v in cached[key]["rounds"])
                ratios.append(f"  {label}: {_x(cached[key]['median'])}  (rounds: {per_round})")
        parts.append("Ratios (per round, then the median)\n" + "\n".join(ratios))
    cold = results.get("cold")
    if cold:
        parts.append(
            "\nCold path\n"
            f"  {cold['requests']} concurrent requests for {cold['credentials']} cold credentials, "
            f"IdM delay {cold['idm_delay_ms']} ms\n"
            f"  exchanges at the IdM: {cold['exchanges']}   statuses: {cold['statuses']}   "
            f"cache: {cold['cache']}\n"
            + (f"  errors: {cold['problems']}\n" if cold.get("problems") else "")
            + "".join(f"  {name}: +{value:g}\n" for name, value in cold.get("metrics", {}).items())
            + f"  all answered in {cold['all_answered_s']:.3f} s (bar {cold['bar_s']:.3f} s); "
            f"per request p50 {cold['p50_ms']:.1f} ms, p99 {cold['p99_ms']:.1f} ms"
        )
    scale = results.get("scale")
    if scale:
        warm = scale["warm"]
        per_round = " ".join(f"{v:.2f}" for v in scale["ratio_rps"]["rounds"])
        parts.append(
            f"\nScale: {scale['credentials']:,} cached credentials\n"
            f"  warm-up ({_WARM[warm['method']]}, then each vended once): "
            f"{warm['seconds']:.1f} s, {warm['vends_per_s']:,.0f} vends/s, cache {warm['cache']}, "
            f"{warm['exchanges']} exchanges\n"
            + _table(_load_rows(scale["median"]), header)
            + f"\n  throughput random-of-{scale['credentials']} / one credential: "
            f"{_x(scale['ratio_rps']['median'])} (rounds: {per_round}); "
            f"p99 ratio {_x(scale['ratio_p99']['median'])}\n"
            f"  idle worker CPU with {scale['credentials']:,} cached: "
            f"{scale['idle_worker_cpu_percent']:.1f} % of a core"
        )
    memory = results.get("memory")
    if memory:
        # [{"when": label, "rss_mb": {server: {pid: MB}}}, ...] in the order they were taken
        workers = sorted(
            {(server, pid) for m in memory for server, pids in m["rss_mb"].items() for pid in pids}
        )
        rows = [
            [server, pid]
            + [f"{m['rss_mb'].get(server, {}).get(pid, float('nan')):.1f}" for m in memory]
            for server, pid in workers
        ]
        parts.append(
            "\nResident memory per worker (VmRSS, MB) at each checkpoint\n"
            + _table(rows, ["server", "pid", *(m["when"] for m in memory)])
        )
    refresher = results.get("refresher")
    if refresher:
        idle, due = refresher["idle_tick_ms"], refresher["due_tick"]
        per = due["ms_per_refresh"]
        parts.append(
            "\nRefresher (Refresher.tick() in this process, same database and Redis)\n"
            f"  tick with nothing due: median {idle['median']:.2f} ms, max {idle['max']:.2f} ms "
            f"({idle['samples']} ticks)\n"
            f"  tick with {due['due']} due: {due['ms']:.0f} ms, {due['refreshed']} refreshed, "
            f"{due['idm_exchanges']} exchanges" + (f", {per:.1f} ms per refresh" if per else "")
        )
    table = verdicts(results)
    if table:
        parts.append(
            "\nTargets (issue 6)\n"
            + _table(
                [[v.target, v.figure, v.bar, v.label] for v in table],
                ["target", "figure", "bar", "result"],
            )
        )
    return "\n".join(parts)


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**results, "verdicts": [{**asdict(v), "result": v.label} for v in verdicts(results)]}
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
