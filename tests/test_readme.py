"""The README's configuration table stays true: every setting is documented, nothing extra."""

from __future__ import annotations

import re
from pathlib import Path

from app.core.config import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Variables of the command-line client, not of the service.
CLIENT_SIDE = {"TOKENVEND_URL", "TOKENVEND_API_KEY"}


def test_every_setting_is_in_the_configuration_table() -> None:
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(TOKENVEND_[A-Z0-9_]+)`", table, flags=re.M))
    settings = {f"TOKENVEND_{name.upper()}" for name in Settings.model_fields}
    assert documented == settings


def test_the_readme_names_no_setting_that_does_not_exist() -> None:
    named = set(re.findall(r"TOKENVEND_[A-Z0-9_]+[A-Z0-9]", README))
    settings = {f"TOKENVEND_{name.upper()}" for name in Settings.model_fields}
    assert named - settings - CLIENT_SIDE == set()
