from __future__ import annotations

import uuid
from collections.abc import Sequence

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import keys
from app.clients.exceptions import ClientNotFound
from app.clients.models import Client, Role
from app.clients.schemas import ClientCreate, ClientUpdate


def _normalize(teams: list[str]) -> list[str]:
    return ["*"] if "*" in teams else sorted(set(teams))


async def create_client(session: AsyncSession, data: ClientCreate) -> tuple[Client, SecretStr]:
    issued = keys.issue_key()
    client = Client(
        id=uuid.uuid4(),
        name=data.name,
        role=data.role,
        teams=_normalize(data.teams),
        rate_limit_per_second=data.rate_limit_per_second,
        key_id=issued.key_id,
        key_digest=issued.digest,
        disabled=False,
    )
    session.add(client)
    await session.flush()
    return client, issued.key


async def ensure_admin_key(session: AsyncSession, key: str, name: str = "bootstrap-admin") -> bool:
    """Make sure an enabled admin holds `key` (TOKENVEND_BOOTSTRAP_ADMIN_KEY); True if created.

    Replicas start together and all run this: the insert sits in a savepoint, and the one that
    loses the race on the unique key id updates the winner's row instead of failing its start.
    """
    key_id = keys.parse_key_id(key)
    if key_id is None:
        raise ValueError("the bootstrap admin key is not a tvk_<key id>_<secret> key")
    digest = keys.digest(key)
    client = await find_by_key_id(session, key_id)
    if client is None:
        try:
            async with session.begin_nested():
                session.add(
                    Client(
                        id=uuid.uuid4(),
                        name=name,
                        role=Role.ADMIN,
                        teams=["*"],
                        key_id=key_id,
                        key_digest=digest,
                        disabled=False,
                    )
                )
            return True
        except IntegrityError:
            client = await find_by_key_id(session, key_id)
            if client is None:
                raise
    client.key_digest = digest
    client.role, client.disabled = Role.ADMIN, False
    return False


async def get_client(session: AsyncSession, client_id: uuid.UUID) -> Client:
    client = await session.get(Client, client_id)
    if client is None:
        raise ClientNotFound(f"no client {client_id}")
    return client


async def find_by_key_id(session: AsyncSession, key_id: str) -> Client | None:
    return await session.scalar(select(Client).where(Client.key_id == key_id))


async def list_clients(session: AsyncSession, *, limit: int, offset: int) -> Sequence[Client]:
    query = select(Client).order_by(Client.created_at, Client.id).limit(limit).offset(offset)
    return (await session.scalars(query)).all()


async def update_client(session: AsyncSession, client: Client, data: ClientUpdate) -> Client:
    changes = data.model_dump(exclude_unset=True)
    changes = {k: v for k, v in changes.items() if v is not None or k == "rate_limit_per_second"}
    if "teams" in changes:
        changes["teams"] = _normalize(changes["teams"])
    for field, value in changes.items():
        setattr(client, field, value)
    await session.flush()
    return client


async def rotate_key(session: AsyncSession, client: Client) -> SecretStr:
    """A new key; the old one stops working with the transaction's commit."""
    issued = keys.issue_key()
    client.key_id, client.key_digest = issued.key_id, issued.digest
    await session.flush()
    return issued.key


async def delete_client(session: AsyncSession, client: Client) -> None:
    await session.delete(client)
    await session.flush()
