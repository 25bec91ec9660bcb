"""`python -m bench --profile` (`make profile`): where a cached vend spends its time.

Sets up like the benchmark (PostgreSQL, Redis, dev IdM, `tokenvend serve --workers 1`), drives the
cached vend with the load generator and samples the worker with py-spy (installed into this venv
on first use; it is on PyPI). Writes `bench/results/profile.speedscope.json` (speedscope.app opens
it) and prints the top frames by own time and by inclusive time, and own time summed per package.

Where py-spy cannot attach (no ptrace in a container), it falls back to pyinstrument, in this
process, on the ASGI app under an in-process load (httpx ASGITransport): that profile then also
contains the client and lacks uvicorn's HTTP parsing, so read it with that in mind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import pyload, scenarios
from bench.load import Target, drive, loadgen_name
from bench.stack import ROOT, Stack

TOP = 25
_LOOP_FRAMES = frozenset({"Runner.run", "BaseEventLoop.run_forever", "Thread._bootstrap_inner"})
PY_SPY_RATE = 250  # samples per second


def _ensure_tool(module: str, executable: str | None = None) -> Path | None:
    """The tool from this venv, installed with pip at first use."""
    if executable is not None:
        path = Path(sys.executable).with_name(executable)
        if path.exists():
            return path
    else:
        with contextlib.suppress(ImportError):
            __import__(module)
            return Path(sys.executable)
    print(f"profile: installing {module} into {sys.prefix} (pip)", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", module], check=False)
    if done.returncode != 0:
        return None
    if executable is not None:
        path = Path(sys.executable).with_name(executable)
        return path if path.exists() else None
    return Path(sys.executable)


def main(args: argparse.Namespace) -> int:
    return pyload.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    loadgen = loadgen_name(args.loadgen)
    options = scenarios.Options(
        quick=True,
        rounds=1,
        duration=args.profile_seconds,
        warmup=1.0,
        connections=args.connections,
        loadgen=loadgen,
        scale_teams=0,
        cold_credentials=0,
        cold_per_credential=0,
        idm_delay_ms=0,
    )
    out_dir = args.output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(pg_admin_url=args.pg_admin_url, redis_url=args.redis_url)
    print(f"profile: setting up in {stack.workdir}", flush=True)
    async with stack:
        ctx = scenarios.Context(stack, options, print)
        await scenarios.prepare(ctx, cold=False, scale=False)
        assert ctx.service is not None
        target = Target(
            "tokenvend-w1",
            ctx.w1.port,
            ctx.service.headers,
            scenarios.TOKEN_PATH.format(team=scenarios.BENCH_TEAM),
        )
        await drive(target, connections=args.connections, duration=2.0, loadgen=loadgen)
        if args.profiler in ("auto", "py-spy"):
            py_spy = _ensure_tool("py-spy", "py-spy")
            if py_spy is not None:
                ok = await _py_spy(ctx, target, py_spy, args, loadgen, out_dir)
                if ok:
                    return 0
            if args.profiler == "py-spy":
                print("profile: py-spy could not sample the worker", file=sys.stderr)
                return 1
            print("profile: falling back to pyinstrument (in-process, ASGITransport)", flush=True)
        return await _pyinstrument(ctx, args, out_dir)


async def _py_spy(
    ctx: scenarios.Context,
    target: Target,
    py_spy: Path,
    args: argparse.Namespace,
    loadgen: str,
    out_dir: Path,
) -> bool:
    pid = ctx.w1.worker_pids()[0]
    output = out_dir / "profile.speedscope.json"
    seconds = args.profile_seconds
    load = asyncio.create_task(
        drive(target, connections=args.connections, duration=seconds + 2, loadgen=loadgen)
    )
    await asyncio.sleep(1.0)
    print(f"profile: py-spy record --pid {pid} for {seconds:g} s under load", flush=True)
    process = await asyncio.create_subprocess_exec(
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(round(seconds)),
        "--rate",
        str(PY_SPY_RATE),
        # Only the thread holding the GIL: idle threads (anyio's pool waiting on its queue) are
        # not reliably recognized as idle in a container and would drown the profile.
        "--gil",
        *(["--native"] if args.profile_native else []),
        "--format",
        "speedscope",
        "--output",
        str(output),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    spy_out, _ = await process.communicate()
    figures = await load
    if process.returncode != 0 or not output.exists():
        print(spy_out.decode(errors="replace")[-2000:], file=sys.stderr)
        return False
    print(
        f"profile: load during sampling: {figures.rps:,.0f} req/s, p50 {figures.p50_ms:.2f} ms, "
        f"p99 {figures.p99_ms:.2f} ms (sampling slows the worker down)\n"
    )
    print(summarize_speedscope(json.loads(output.read_text())))
    print(f"\nspeedscope profile: {output}  (open it at https://www.speedscope.app)")
    return True


def _component(file: str) -> str:
    """The package a frame belongs to: `app/tokens/router.py`, `starlette`, `asyncio`, ..."""
    if "site-packages/" in file:
        rest = file.split("site-packages/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    root = str(ROOT) + "/"
    if file.startswith(root):
        return file[len(root) :]
    if "/lib/python" in file:
        rest = file.split("/lib/python", 1)[1].split("/", 1)[-1]
        return "stdlib:" + rest.split("/", 1)[0].removesuffix(".py")
    return file or "?"


def _short(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    root = str(ROOT) + "/"
    if file.startswith(root):
        return file[len(root) :]
    if "/lib/python" in file:
        return file.split("/lib/python", 1)[1].split("/", 1)[-1]
    return file


def summarize_speedscope(data: dict[str, Any], top: int = TOP) -> str:
    """Own and inclusive time per function (lines of one function merged), per package, and for
    the hottest functions the call chain that most often led to them."""
    frames = data["shared"]["frames"]
    funcs = [(f["name"], _short(f.get("file", ""))) for f in frames]
    own: Counter[tuple[str, str]] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    per_component: Counter[str] = Counter()
    per_thread: Counter[str] = Counter()
    chains: dict[tuple[str, str], Counter[str]] = {}
    below_loop: Counter[tuple[str, str]] = Counter()
    total = 0.0
    for prof in data["profiles"]:
        weights = prof.get("weights") or [1] * len(prof["samples"])
        label = prof.get("name", "")
        thread = label.split('"')[1] if label.count('"') >= 2 else label or "?"
        for stack, weight in zip(prof["samples"], weights, strict=True):
            if not stack:
                continue
            total += weight
            per_thread[thread] += weight
            leaf = funcs[stack[-1]]
            own[leaf] += weight
            per_component[_component(frames[stack[-1]].get("file", ""))] += weight
            for func in {funcs[i] for i in stack}:
                inclusive[func] += weight
            # Below the event loop: what runs inside it, without the bootstrap chain above it
            # (typer, uvicorn.run, asyncio's Runner), which is in every sample.
            loop_at = next(
                (k for k in range(len(stack) - 1, -1, -1) if funcs[stack[k]][0] in _LOOP_FRAMES),
                -1,
            )
            for func in {funcs[i] for i in stack[loop_at + 1 :]}:
                below_loop[func] += weight
            callers = " <- ".join(funcs[i][0] for i in reversed(stack[-6:-1]))
            chains.setdefault(leaf, Counter())[callers] += weight
    if not total:
        return "no samples"

    def pct(count: float) -> str:
        return f"{count / total * 100:6.1f} %"

    def func_name(func: tuple[str, str]) -> str:
        return f"{func[0]} ({func[1]})"

    def block(title: str, counter: Counter[Any], label: Any, *, with_callers: bool = False) -> str:
        rows = []
        for key, count in counter.most_common(top):
            rows.append(f"{pct(count)}  {label(key)}")
            if with_callers and key in chains:
                chain, _ = chains[key].most_common(1)[0]
                rows.append(f"            <- {chain}")
        return f"{title}\n" + "\n".join(rows)

    app_prefix = "app/"
    app_funcs = Counter({f: c for f, c in below_loop.items() if f[1].startswith(app_prefix)})
    unit = "s" if data["profiles"] and data["profiles"][0].get("unit") == "seconds" else ""
    return "\n\n".join(
        [
            f"{total:.2f}{unit} of samples holding the GIL; by thread: "
            + ", ".join(f"{t} {c / total * 100:.1f} %" for t, c in per_thread.most_common(3)),
            block("Own time by package (where the CPU is)", per_component, str),
            block(
                "Top functions by own time, with the call chain that most often led there",
                own,
                func_name,
                with_callers=True,
            ),
            block("Top functions by inclusive time (below the event loop)", below_loop, func_name),
            block("tokenvend's own functions by inclusive time", app_funcs, func_name),
        ]
    )


async def _pyinstrument(ctx: scenarios.Context, args: argparse.Namespace, out_dir: Path) -> int:
    if _ensure_tool("pyinstrument") is None:
        print("profile: pyinstrument is not installable either", file=sys.stderr)
        return 1
    import httpx
    from pyinstrument import Profiler

    from app.core.config import Settings
    from app.main import create_app

    stack = ctx.stack
    assert ctx.service is not None
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        redis_prefix=stack.prefix,
        encryption_keys=stack.encryption_keys,
        phrase_eu_url=stack.idm.url,
        phrase_us_url=stack.idm.url,
        rate_limit_per_second=1_000_000,
        rate_limit_burst=10_000_000,
        log_level="WARNING",
        access_log=False,
    )
    app = create_app(settings)
    path = scenarios.TOKEN_PATH.format(team=scenarios.BENCH_TEAM)
    headers = ctx.service.headers
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tokenvend.bench"
        ) as http,
    ):
        (await http.get(path, headers=headers)).raise_for_status()
        count = 0

        async def loop(deadline: float) -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                (await http.get(path, headers=headers)).raise_for_status()
                count += 1

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        started = time.perf_counter()
        deadline = started + args.profile_seconds
        await asyncio.gather(*(loop(deadline) for _ in range(args.connections)))
        elapsed = time.perf_counter() - started
        profiler.stop()
    text = profiler.output_text(unicode=True, color=False, show_all=False)
    (out_dir / "profile.pyinstrument.txt").write_text(text)
    print(f"profile: {count / elapsed:,.0f} req/s in-process under the profiler\n")
    print(text)
    return 0
