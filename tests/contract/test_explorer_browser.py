"""A real browser in the OpenAPI explorer: authorize with a client key, run getToken, see a JWT."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import Env
from tests.support.servers import ServerThread

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    path = os.environ.get("TOKENVEND_CHROMIUM") or shutil.which("chromium")
    if path is None:
        message = "Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; in CI every test must run", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def explorer(env: Env) -> Iterator[tuple[str, str]]:
    with ServerThread(create_app(env.settings)) as running:
        admin = {"Authorization": f"Bearer {env.admin_key}"}
        with httpx.Client(base_url=running.url, headers=admin) as http:
            http.post("/v1/teams", json={"slug": "acme"}).raise_for_status()
            http.post(
                "/v1/teams/acme/credentials",
                json={"region": "eu", "api_token": "phrdev_browser_token_01"},
            ).raise_for_status()
            created = http.post("/v1/clients", json={"name": "browser", "teams": ["acme"]})
        yield running.url, created.json()["api_key"]


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
async def test_authorize_and_fetch_a_token_in_the_explorer(
    explorer: tuple[str, str], env: Env, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    url, client_key = explorer
    executable = chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{url}/docs")
            await page.locator("button.authorize").first.click()
            modal = page.locator(".modal-ux")
            bearer = modal.locator("form").filter(has_text="ClientKey")
            await bearer.locator("input").first.fill(client_key)
            await bearer.locator("button.authorize").click()
            await modal.locator("button.btn-done").first.click()

            operation = page.locator("#operations-tokens-getToken")
            await operation.locator(".opblock-summary").click()
            await operation.locator("button.try-out__btn").click()
            await operation.locator('tr[data-param-name="team"] input').fill("acme")
            await operation.locator("button.execute").click()

            status = operation.locator(
                ".live-responses-table tr.response .response-col_status"
            ).first
            await expect(status).to_have_text("200", timeout=15_000)
            body = await operation.locator(".live-responses-table .microlight").first.inner_text()
            screenshot = tmp_path / "explorer.png"
            await page.screenshot(path=str(screenshot), full_page=False)
        finally:
            await browser.close()
    assert '"access_token"' in body
    assert '"cache"' in body
    assert env.idm.exchanges == 1
    print(f"explorer screenshot: {screenshot}")
