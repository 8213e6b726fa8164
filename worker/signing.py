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


def verify(body: dict[str, Any], secret: str) -> str | None:
    """None when the signature is right, else why it is not. Compared in constant time."""
    given = body.get("signature")
    if not isinstance(given, str) or not given:
        return "the callback carries no signature"
    try:
        expected = sign(body, secret)
    except (TypeError, ValueError) as exc:
        return f"the callback cannot be serialised for signing: {exc}"
    if not hmac.compare_digest(given.encode("utf-8", errors="replace"), expected.encode("ascii")):
        return "the signature does not match the body"
    return None
