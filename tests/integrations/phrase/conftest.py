from __future__ import annotations

import pytest

from app.integrations.phrase.dev_idm import DevIdm


@pytest.fixture
def idm(dev_idm_server: tuple[DevIdm, str]) -> DevIdm:
    """The session's IdM (tests/conftest.py) with fresh counters, mode and token registrations."""
    idm, _ = dev_idm_server
    idm.reset(tokens=True)
    return idm


@pytest.fixture
def idm_url(dev_idm_server: tuple[DevIdm, str]) -> str:
    return dev_idm_server[1]
