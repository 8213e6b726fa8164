"""HMAC-SHA256 signatures of payment callbacks (CONTRACT.md section 7)."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any


def canonical(body: dict[str, Any]) -> bytes:
    """The body without `signature`, as JSON with sorted keys, separators , and :, UTF-8
    (non-ASCII as \\uXXXX escapes, Python's json.dumps default)."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(body: dict[str, Any], secret: str) -> str:
    """The lowercase hex HMAC-SHA256 of the canonical body under the secret."""
    return hmac.new(secret.encode("utf-8"), canonical(body), hashlib.sha256).hexdigest()


def secrets_of(setting: str) -> tuple[str, ...]:
    """CALLBACK_SIGNING_SECRET as its secrets: a comma-separated list while a secret is rotated."""
    return tuple(s.strip() for s in setting.split(",") if s.strip())


def verify(body: dict[str, Any], secrets: str | tuple[str, ...]) -> str | None:
    """None when the signature is right under any of the secrets, else why it is not. Every
    secret is compared in constant time, so the answer does not tell which one came closer."""
    if isinstance(secrets, str):
        secrets = secrets_of(secrets)
    given = body.get("signature")
    if not isinstance(given, str) or not given:
        return "the callback carries no signature"
    try:
        expected = [sign(body, secret) for secret in secrets]
    except (TypeError, ValueError) as exc:
        return f"the callback cannot be serialised for signing: {exc}"
    given_bytes = given.encode("utf-8", errors="replace")
    matches = [hmac.compare_digest(given_bytes, e.encode("ascii")) for e in expected]
    if not any(matches):
        return "the signature does not match the body under any configured secret"
    return None
