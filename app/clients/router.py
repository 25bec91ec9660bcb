from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, status

from app.audit import service as audit
from app.audit.dependencies import request_record
from app.auth.dependencies import Admin
from app.clients import service
from app.clients.schemas import ClientCreate, ClientRead, ClientUpdate, ClientWithKey
from app.core.deps import PagingDep, SessionDep
from app.core.problems import AUTHENTICATED, responses
from app.core.schemas import Page

router = APIRouter(prefix="/v1/clients", tags=["clients"], responses=responses(*AUTHENTICATED))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ClientWithKey,
    operation_id="createClient",
    summary="Create a client and its API key",
)
async def create_client(
    request: Request, data: ClientCreate, _admin: Admin, session: SessionDep
) -> ClientWithKey:
    """Create an internal service (role `client`, with team grants) or an admin. The API key is
    in this response only: store it now."""
    client, key = await service.create_client(session, data)
    audit.add(
        session,
        request_record(
            request,
            "client.create",
            details={"client_id": str(client.id), "role": client.role, "teams": client.teams},
        ),
    )
    return ClientWithKey(client=ClientRead.model_validate(client), api_key=key.get_secret_value())


@router.get("", response_model=Page[ClientRead], operation_id="listClients", summary="List clients")
async def list_clients(_admin: Admin, session: SessionDep, paging: PagingDep) -> Page[ClientRead]:
    """Clients in creation order; keys are never shown, only their public key ids."""
    found = await service.list_clients(session, limit=paging.limit + 1, offset=paging.offset)
    return Page.of(
        [ClientRead.model_validate(c) for c in found], limit=paging.limit, offset=paging.offset
    )


@router.get(
    "/{client_id}",
    response_model=ClientRead,
    operation_id="getClient",
    summary="Get a client",
    responses=responses(404),
)
async def get_client(client_id: uuid.UUID, _admin: Admin, session: SessionDep) -> ClientRead:
    """One client: role, grants, whether disabled, when last used."""
    return ClientRead.model_validate(await service.get_client(session, client_id))


@router.patch(
    "/{client_id}",
    response_model=ClientRead,
    operation_id="updateClient",
    summary="Rename, re-grant, disable or enable a client",
    responses=responses(404),
)
async def update_client(
    request: Request, client_id: uuid.UUID, data: ClientUpdate, _admin: Admin, session: SessionDep
) -> ClientRead:
    """Changes take effect on the client's next request, on every replica."""
    client = await service.update_client(
        session, await service.get_client(session, client_id), data
    )
    details = {"client_id": str(client_id)} | data.model_dump(mode="json", exclude_unset=True)
    audit.add(session, request_record(request, "client.update", details=details))
    return ClientRead.model_validate(client)


@router.post(
    "/{client_id}/rotate-key",
    response_model=ClientWithKey,
    operation_id="rotateClientKey",
    summary="Issue a new API key",
    responses=responses(404),
)
async def rotate_client_key(
    request: Request, client_id: uuid.UUID, _admin: Admin, session: SessionDep
) -> ClientWithKey:
    """A new API key for the client; the old one stops working immediately."""
    client = await service.get_client(session, client_id)
    key = await service.rotate_key(session, client)
    audit.add(
        session, request_record(request, "client.rotate-key", details={"client_id": str(client_id)})
    )
    return ClientWithKey(client=ClientRead.model_validate(client), api_key=key.get_secret_value())


@router.delete(
    "/{client_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteClient",
    summary="Delete a client",
    responses=responses(404),
)
async def delete_client(
    request: Request, client_id: uuid.UUID, _admin: Admin, session: SessionDep
) -> None:
    """Delete the client; its key stops working on its next request, on every replica."""
    await service.delete_client(session, await service.get_client(session, client_id))
    audit.add(
        session, request_record(request, "client.delete", details={"client_id": str(client_id)})
    )
