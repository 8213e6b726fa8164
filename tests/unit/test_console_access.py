"""The console's access rules, on their own: named tokens, the loopback rule, sessions that end
when their token is rotated out, CSRF tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from worker.config import ConfigurationError, Settings, load_settings
from worker.console import access

ROOT = Path(__file__).resolve().parents[2]


def test_console_token_holds_named_tokens(monkeypatch):
    monkeypatch.setenv("CONSOLE_TOKEN", "alice:first-secret, bob:second-secret")
    assert Settings().console_tokens == {"first-secret": "alice", "second-secret": "bob"}
    for wrong in ("no-name-here", "alice:short", "alice:long-enough-1,alice:long-enough-2"):
        monkeypatch.setenv("CONSOLE_TOKEN", wrong)
        with pytest.raises(ConfigurationError, match="CONSOLE_TOKEN"):
            load_settings()


def test_beyond_loopback_needs_a_token():
    for address in ("127.0.0.1", "::1", "localhost"):
        access.check_binding(address, {})
    for address in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(access.BindingRefused):
            access.check_binding(address, {})
        access.check_binding(address, {"long-secret": "alice"})


def test_a_session_ends_when_its_token_is_rotated_out():
    tokens = {"old-secret-1": "alice", "new-secret-2": "alice-new"}
    name, tid = access.login(tokens, " old-secret-1 ")
    assert name == "alice" and access.login(tokens, "old-secret") is None
    session = {"who": name, "tid": tid}
    assert access.who(session, tokens) == "alice"
    assert access.who(session, {"new-secret-2": "alice-new"}) is None
    assert access.who({"who": "alice", "tid": "forged"}, tokens) is None
    assert access.session_key(tokens) == access.session_key(dict(tokens))
    assert access.session_key(tokens) != access.session_key({"new-secret-2": "alice-new"})


def test_csrf_tokens():
    session: dict = {}
    token = access.csrf_token(session)
    assert access.csrf_token(session) == token and access.csrf_ok(session, token)
    assert not access.csrf_ok(session, None) and not access.csrf_ok(session, token + "x")
    assert not access.csrf_ok({}, "")


def test_compose_serves_the_console_with_a_token():
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["console"]
    assert service["command"] == ["invoice-worker", "console"]
    assert service["environment"]["CONSOLE_ADDRESS"] == "0.0.0.0" and service["environment"]["CONSOLE_TOKEN"]


def test_console_token_secrets_never_reach_a_log_line(monkeypatch):
    from worker.config import settings
    from worker.operations.logs import secrets

    monkeypatch.setenv("CONSOLE_TOKEN", "alice:first-secret-x,bob:second-secret-y")
    settings.cache_clear()
    try:
        hidden = secrets()
        assert {"first-secret-x", "second-secret-y"} <= set(hidden) and "alice" not in hidden
    finally:
        monkeypatch.delenv("CONSOLE_TOKEN")
        settings.cache_clear()
