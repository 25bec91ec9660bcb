"""Re-encrypt every stored API token under the keyring's first key (encryption key rotation).

Online and idempotent: rows are processed in batches of their own transactions, each update is a
compare-and-set on the old key id and ciphertext (an admin rotating the API token meanwhile wins),
and a second run finds nothing to do. The version is not bumped: the API token is unchanged, so
cached JWTs stay valid. Rows that do not decrypt are counted and left alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.crypto import DecryptionFailed, Keyring, Sealed
from app.credentials.models import Credential, api_token_aad


@dataclass(slots=True)
class RekeyReport:
    scanned: int = 0
    reencrypted: int = 0
    changed_meanwhile: int = 0
    failed: int = 0


async def reencrypt_all(
    sessionmaker: async_sessionmaker[AsyncSession], keyring: Keyring, *, batch_size: int = 100
) -> RekeyReport:
    report = RekeyReport()
    after = uuid.UUID(int=0)  # keyset pagination: each row is visited once per run
    while True:
        async with sessionmaker() as session, session.begin():
            rows = (
                await session.execute(
                    select(
                        Credential.id, Credential.api_token_key_id, Credential.api_token_ciphertext
                    )
                    .where(Credential.api_token_key_id != keyring.primary_id, Credential.id > after)
                    .order_by(Credential.id)
                    .limit(batch_size)
                )
            ).all()
            if not rows:
                return report
            for cred_id, key_id, blob in rows:
                report.scanned += 1
                after = cred_id
                aad = api_token_aad(cred_id)
                try:
                    plaintext = keyring.open(Sealed(key_id, blob), aad)
                except DecryptionFailed:
                    report.failed += 1
                    continue
                sealed = keyring.seal(plaintext, aad)
                result = await session.execute(
                    update(Credential)
                    .where(
                        Credential.id == cred_id,
                        Credential.api_token_key_id == key_id,
                        Credential.api_token_ciphertext == blob,
                    )
                    .values(api_token_key_id=sealed.key_id, api_token_ciphertext=sealed.blob)
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    report.reencrypted += 1
                else:
                    report.changed_meanwhile += 1  # rotated by an admin: already re-sealed
