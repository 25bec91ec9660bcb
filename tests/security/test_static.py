"""Static checks: bandit finds nothing of medium or high severity in `app/`, and no code compares
secret values with `==` or `!=` (which returns as soon as a byte differs: a timing oracle);
secrets are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"

SECRET_NAME = re.compile(r"key|token|secret|digest", re.IGNORECASE)

# Identifiers that match SECRET_NAME but never hold a secret. Each entry needs a reason; an entry
# nothing uses any more fails `test_the_allow_list_has_no_stale_entries`, so the list stays tight.
NOT_SECRET: dict[str, str] = {
    # The public half of a client key (`tvk_<key id>_<secret>`), shown in every client view and
    # used to find the row; the secret half is checked by digest with hmac.compare_digest.
    "key_id": "public client-key id / encryption-key id",
    # Names which encryption key sealed a row (`kid`), never key material.
    "api_token_key_id": "id of the sealing encryption key",
    # AES-GCM output, useless without the key; compared inside the database (the rekey's
    # compare-and-set `WHERE ciphertext = :old`), not in Python.
    "api_token_ciphertext": "sealed value, compared in SQL",
    # A length constant (32 bytes for AES-256).
    "KEY_BYTES": "key length constant",
    # Public URNs from RFC 8693 and the Phrase docs, compared with request form fields.
    "GRANT_TYPE_TOKEN_EXCHANGE": "public OAuth grant type URN",
    "TOKEN_TYPE_API_TOKEN": "public token type URN",
    "TOKEN_TYPE_ACCESS_TOKEN": "public token type URN",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    name: str
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: `{self.code}` compares {self.name!r} with ==/!="


def _identifier(node: ast.expr) -> str | None:
    """The name an operand is known by: `x`, `obj.x`, `f(...)`/`obj.f(...)` (what a call
    returns is named by the function, e.g. `hexdigest()`), and `d["x"]`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _identifier(node.func)
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    ):
        return node.slice.value
    return None


def secret_comparisons(
    source: str, path: str = "<string>", allowed: dict[str, str] | None = None
) -> tuple[list[Finding], set[str]]:
    """`==`/`!=` comparisons with an operand named like a secret, and the allow-list entries that
    excused one."""
    allowed = NOT_SECRET if allowed is None else allowed
    findings: list[Finding] = []
    used: set[str] = set()
    for node in ast.walk(ast.parse(source, path)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if not isinstance(op, ast.Eq | ast.NotEq):
                continue
            for operand in (operands[i], operands[i + 1]):
                name = _identifier(operand)
                if name is None or not SECRET_NAME.search(name):
                    continue
                if name in allowed:
                    used.add(name)
                    continue
                findings.append(Finding(path, node.lineno, name, ast.unparse(node)))
    return findings, used


def scan_app() -> tuple[list[Finding], set[str]]:
    findings: list[Finding] = []
    used: set[str] = set()
    for path in sorted(APP.rglob("*.py")):
        found, excused = secret_comparisons(path.read_text(), str(path.relative_to(ROOT)))
        findings += found
        used |= excused
    return findings, used


class TestSecretComparisons:
    def test_no_secret_is_compared_with_eq_or_ne_in_app(self) -> None:
        findings, _ = scan_app()
        assert not findings, "use hmac.compare_digest for secrets:\n" + "\n".join(
            map(str, findings)
        )

    def test_the_allow_list_has_no_stale_entries(self) -> None:
        _, used = scan_app()
        assert set(NOT_SECRET) - used == set(), "remove allow-list entries nothing needs"

    def test_the_checker_flags_a_synthetic_secret_comparison(self) -> None:
        snippet = textwrap.dedent(
            """
            def check(presented, client, stored_digest, api_token, headers, key_id):
                if stored_digest == presented:            # Name
                    return True
                if client.api_key != presented:           # Attribute
                    return False
                if hashlib.sha256(presented).hexdigest() == stored_digest:  # Call, both sides
                    return True
                if headers["X-Secret"] == presented:       # Subscript
                    return True
                if presented == api_token.get_secret_value():  # right-hand side, a Call
                    return True
                if 1 < len(presented) == MIN_LENGTH:      # chained; not named like a secret
                    return True
                if key_id == presented:                   # allow-listed: public key id
                    return True
                if api_token is None or api_token in presented:  # `is`/`in`: not ==/!=
                    return False
                return hmac.compare_digest(stored_digest, presented)
            """
        )
        findings, used = secret_comparisons(snippet, "synthetic.py")
        flagged = sorted((f.line, f.name) for f in findings)
        assert flagged == [
            (3, "stored_digest"),
            (5, "api_key"),
            (7, "hexdigest"),
            (7, "stored_digest"),
            (9, "X-Secret"),
            (11, "get_secret_value"),
        ]
        assert used == {"key_id"}

    def test_an_unlisted_name_is_not_excused(self) -> None:
        findings, _ = secret_comparisons("ok = key_id == other\n", allowed={})
        assert [f.name for f in findings] == ["key_id"]


class TestBandit:
    def test_bandit_reports_no_medium_or_high_finding_in_app(self) -> None:
        bandit = Path(sys.executable).with_name("bandit")
        result = subprocess.run(
            [str(bandit), "-r", "app", "-ll", "-f", "json", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        report = json.loads(result.stdout)
        issues = [
            f"{i['filename']}:{i['line_number']} {i['test_id']} {i['issue_severity']}: "
            f"{i['issue_text']}"
            for i in report["results"]
        ]
        assert not issues, "\n".join(issues)
        assert not report["errors"], report["errors"]
        assert result.returncode == 0, result.stderr
        # The scan covered the code: a broken target would also report no issues.
        assert report["metrics"]["_totals"]["loc"] > 1000
