"""The `tokenvend` command line: serve, migrate, make keys, run the development IdM."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import SecretStr

from app.core.config import DatabaseSettings, Settings, format_validation_error

if TYPE_CHECKING:
    from app.credentials.rekey import RekeyReport

if TYPE_CHECKING:
    pass

cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
db_cli = typer.Typer(no_args_is_help=True, help="Database schema.")
admin_cli = typer.Typer(no_args_is_help=True, help="Client keys, from the shell.")
keys_cli = typer.Typer(no_args_is_help=True, help="Encryption keys.")
cli.add_typer(db_cli, name="db")
cli.add_typer(admin_cli, name="admin")
cli.add_typer(keys_cli, name="keys")

ROOT = Path(__file__).resolve().parent.parent
DEV_DIR = Path(".tokenvend")


def _fail(lines: list[str]) -> NoReturn:
    typer.echo("tokenvend: invalid configuration:", err=True)
    for line in lines:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(2)


def load_settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic's ValidationError, with one line per bad value
        _fail(format_validation_error(exc))


def upgrade_database(url: str, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = url
    command.upgrade(config, revision)


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database (TOKENVEND_DATABASE_URL) to REVISION."""
    try:
        url = DatabaseSettings().database_url.get_secret_value()
    except Exception as exc:
        _fail(format_validation_error(exc))
    upgrade_database(url, revision)
    typer.echo(f"database at {revision}")


@keys_cli.command("generate")
def keys_generate(kid: Annotated[str | None, typer.Option(help="Key id.")] = None) -> None:
    """Print a new encryption key as `kid:base64`; put it first in TOKENVEND_ENCRYPTION_KEYS."""
    from app.core.crypto import Keyring

    typer.echo(Keyring.generate_spec(kid))


@keys_cli.command("rotate")
def keys_rotate(
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per transaction.")] = 100,
) -> None:
    """Re-encrypt every API token under the first key of TOKENVEND_ENCRYPTION_KEYS, online.

    Put the new key first and keep the old ones after it until this reports failed=0 and every
    replica runs with the new keyring; then the old key can go."""
    settings = load_settings()
    report = asyncio.run(_rekey(settings, batch_size))
    typer.echo(
        f"scanned={report.scanned} reencrypted={report.reencrypted} "
        f"changed_meanwhile={report.changed_meanwhile} failed={report.failed} "
        f"primary_key={settings.keyring.primary_id}"
    )
    if report.failed:
        raise typer.Exit(1)


async def _rekey(settings: Settings, batch_size: int) -> RekeyReport:
    from app.core.db import create_engine, create_sessionmaker
    from app.credentials.rekey import reencrypt_all

    engine = create_engine(settings)
    try:
        return await reencrypt_all(
            create_sessionmaker(engine), settings.keyring, batch_size=batch_size
        )
    finally:
        await engine.dispose()


@admin_cli.command("create-key")
def admin_create_key(
    name: Annotated[str, typer.Option(help="Who the key is for.")],
    role: Annotated[str, typer.Option(help="admin or client.")] = "admin",
    team: Annotated[list[str] | None, typer.Option(help="Granted team slug (repeatable).")] = None,
) -> None:
    """Create a client and print its API key (how the first admin is made)."""
    from app.clients.models import Role
    from app.clients.schemas import ClientCreate

    settings = load_settings()
    data = ClientCreate(
        name=name, role=Role(role), teams=team or (["*"] if role == "admin" else [])
    )
    typer.echo(asyncio.run(_create_client(settings, data)))


async def _create_client(settings: Settings, data: object) -> str:
    from app.clients.schemas import ClientCreate
    from app.clients.service import create_client
    from app.core.db import create_engine, create_sessionmaker

    assert isinstance(data, ClientCreate)
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            _, key = await create_client(session, data)
    finally:
        await engine.dispose()
    return key.get_secret_value()


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (needs Redis if > 1).")] = 1,
    dev: Annotated[
        bool, typer.Option(help="Embedded default: SQLite, in-process cache, development IdM.")
    ] = False,
) -> None:
    """Serve the REST API."""
    import uvicorn

    if dev:
        workers = 1
        _prepare_dev(port)
    settings = load_settings()
    if workers > 1 and settings.redis_url is None:
        _fail(
            [
                "TOKENVEND_REDIS_URL: required with more than one worker "
                "(the in-process cache cannot be shared between processes)"
            ]
        )
    if not dev and settings.is_sqlite:
        upgrade_database(settings.database_url.get_secret_value())
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker writes its samples here; /metrics sums them (set before any metric exists).
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="tokenvend-metrics-")
    from app.core.logging import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        server_header=False,
        date_header=True,
        access_log=False,  # our own access log names route templates (app.access)
        log_config=None,
        timeout_graceful_shutdown=20,
    )


def _exit_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    """A requested stop is not a failure. uvicorn shuts down gracefully on SIGTERM, then raises the
    signal again under the handler that was in place before it started; with the default handler
    the process would die by the signal (status 143) after a clean shutdown."""
    sys.exit(0)


def _prepare_dev(port: int) -> None:
    """Dev state lives in a git-ignored folder: the SQLite file and the encryption key."""
    DEV_DIR.mkdir(exist_ok=True)
    key_file = DEV_DIR / "encryption.key"
    if not key_file.exists():
        from app.core.crypto import Keyring

        key_file.touch(mode=0o600)
        key_file.write_text(Keyring.generate_spec("dev") + "\n")
    idm = f"http://127.0.0.1:{port}/dev-idm"
    os.environ.update(
        {
            "TOKENVEND_DEV": "true",
            "TOKENVEND_DATABASE_URL": f"sqlite+aiosqlite:///{(DEV_DIR / 'dev.db').resolve()}",
            "TOKENVEND_REDIS_URL": "",
            "TOKENVEND_ENCRYPTION_KEYS": key_file.read_text().strip(),
            "TOKENVEND_PHRASE_EU_URL": idm,
            "TOKENVEND_PHRASE_US_URL": idm,
            "TOKENVEND_LOG_FORMAT": os.environ.get("TOKENVEND_LOG_FORMAT", "console"),
        }
    )
    settings = load_settings()
    upgrade_database(settings.database_url.get_secret_value())
    admin_key, client_key = asyncio.run(_seed_dev(settings))
    base = f"http://127.0.0.1:{port}"
    typer.echo(
        "\n".join(
            [
                "",
                "tokenvend development server (SQLite, in-process cache, development IdM)",
                f"  admin key:  {admin_key}",
                f"  client key: {client_key}   (granted team 'demo')",
                "",
                f"  curl -H 'Authorization: Bearer {client_key}' {base}/v1/teams/demo/token",
                f"  OpenAPI explorer: {base}/docs",
                "",
            ]
        )
    )


async def _seed_dev(settings: Settings) -> tuple[str, str]:
    """Fresh admin and client keys on every start, and a `demo` team the dev IdM accepts."""
    from sqlalchemy import select

    from app.clients.models import Client, Role
    from app.clients.schemas import ClientCreate
    from app.clients.service import create_client, rotate_key
    from app.core.config import Region
    from app.core.db import create_engine, create_sessionmaker
    from app.credentials.schemas import CredentialCreate
    from app.credentials.service import create_credential
    from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX
    from app.teams.models import Team
    from app.teams.schemas import TeamCreate
    from app.teams.service import create_team

    engine = create_engine(settings)
    keys: list[str] = []
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            for name, role, teams in (
                ("dev-admin", Role.ADMIN, ["*"]),
                ("demo-client", Role.CLIENT, ["demo"]),
            ):
                client = await session.scalar(select(Client).where(Client.name == name))
                if client is None:
                    _, key = await create_client(
                        session, ClientCreate(name=name, role=role, teams=teams)
                    )
                else:
                    key = await rotate_key(session, client)
                keys.append(key.get_secret_value())
            if await session.scalar(select(Team).where(Team.slug == "demo")) is None:
                team = await create_team(session, TeamCreate(slug="demo", name="Demo team"))
                await create_credential(
                    session,
                    team,
                    CredentialCreate(
                        region=Region.EU,
                        api_token=SecretStr(f"{ACCEPTED_PREFIX}{secrets.token_urlsafe(24)}"),
                    ),
                    settings.keyring,
                )
    finally:
        await engine.dispose()
    return keys[0], keys[1]


@cli.command("openapi")
def openapi() -> None:
    """Print the OpenAPI document (the committed openapi.json is this output)."""
    import json

    from app.main import create_app

    settings = Settings(_env_file=None, dev=False, encryption_keys=SecretStr(_SPEC_KEY))
    typer.echo(json.dumps(create_app(settings).openapi(), indent=2, sort_keys=True))


# A fixed, throwaway key: building the app needs a keyring, the document does not use it.
_SPEC_KEY = "spec:" + "A" * 43 + "="


@cli.command("dev-idm")
def dev_idm(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8001,
) -> None:
    """Run the development Phrase IdM alone (tokens starting with `phrdev_` are accepted)."""
    import uvicorn

    from app.integrations.phrase.dev_idm import create_dev_idm_app

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    uvicorn.run(create_dev_idm_app(), host=host, port=port, server_header=False)


token_cli = typer.Typer(no_args_is_help=True, help="JWTs from a running tokenvend.")
cli.add_typer(token_cli, name="token")


@token_cli.command("get")
def token_get(
    team: Annotated[str, typer.Argument(help="Team slug.")],
    credential: Annotated[str, typer.Option(help="Credential name.")] = "default",
    min_ttl: Annotated[
        int | None, typer.Option(min=0, help="Minimum remaining lifetime in seconds.")
    ] = None,
) -> None:
    """Print a team's Phrase JWT and nothing else, for `$(tokenvend token get acme)`.

    Asks the tokenvend at TOKENVEND_URL (default http://127.0.0.1:8000) with the client API key in
    TOKENVEND_API_KEY. Errors go to stderr as `tokenvend: <code>: <detail>`, with exit status 1.
    """
    # Plain httpx on purpose: the server package does not depend on the client package.
    from urllib.parse import quote

    import httpx

    base = (os.environ.get("TOKENVEND_URL") or "http://127.0.0.1:8000").rstrip("/")
    api_key = os.environ.get("TOKENVEND_API_KEY", "").strip()
    if not api_key:
        typer.echo("tokenvend: TOKENVEND_API_KEY is not set (a client API key, tvk_...)", err=True)
        raise typer.Exit(2)
    params: dict[str, str | int] = {"credential": credential}
    if min_ttl is not None:
        params["min_ttl"] = min_ttl
    try:
        response = httpx.get(
            f"{base}/v1/teams/{quote(team, safe='')}/token",
            params=params,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=10.0,
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # the request is not echoed: it has the key
        typer.echo(f"tokenvend: unreachable: {base}: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    token = body.get("access_token")
    if response.is_success and isinstance(token, str) and token:
        typer.echo(token)
        return
    code, detail = body.get("code"), body.get("detail")
    if not (isinstance(code, str) and isinstance(detail, str)):
        code, detail = "bad-response", f"HTTP {response.status_code} without a token or a problem"
    typer.echo(f"tokenvend: {code}: {detail.replace(api_key, '[redacted]')}", err=True)
    raise typer.Exit(1)


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
