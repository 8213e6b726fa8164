"""Who may use the console: named tokens (CONSOLE_TOKEN=`name:secret,...`), a signed session
cookie after login (HttpOnly, SameSite=Strict), and a CSRF token in the session for every form.
No token configured: read-only, and only on loopback (`check_binding`)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Any

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


class BindingRefused(Exception):
    pass


def is_loopback(address: str) -> bool:
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_binding(address: str, tokens: dict[str, str]) -> None:
    """Beyond loopback, anyone who reaches the port reaches the console: not without a token."""
    if not tokens and not is_loopback(address):
        raise BindingRefused(f"the console would listen on {address} without CONSOLE_TOKEN; set CONSOLE_TOKEN "
                             f"(name:secret) or CONSOLE_ADDRESS=127.0.0.1")


def session_key(tokens: dict[str, str]) -> str:
    """The cookie-signing key, derived from the tokens: a restart keeps sessions, and rotating a
    token out ends every session (their signatures no longer verify)."""
    if not tokens:
        return secrets.token_hex(32)
    material = "\x1f".join(sorted(f"{name}:{secret}" for secret, name in tokens.items()))
    return hashlib.sha256(b"invoice-worker-console\x1f" + material.encode()).hexdigest()


def token_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def login(tokens: dict[str, str], given: str) -> tuple[str, str] | None:
    """(name, token id) of the token given, compared in constant time with every configured one."""
    found = None
    for secret, name in tokens.items():
        if hmac.compare_digest(secret.encode(), given.strip().encode()):
            found = (name, token_id(secret))
    return found


def who(session: dict[str, Any], tokens: dict[str, str]) -> str | None:
    """The token's name of a logged-in session whose token is still configured."""
    name, tid = session.get("who"), session.get("tid")
    if not name or not tid:
        return None
    return name if any(token_id(s) == tid and n == name for s, n in tokens.items()) else None


def csrf_token(session: dict[str, Any]) -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_ok(session: dict[str, Any], given: Any) -> bool:
    expected = session.get("csrf")
    return bool(expected) and isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
