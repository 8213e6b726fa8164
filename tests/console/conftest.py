"""The console in a real browser: Debian's chromium (installed with apt-get when missing, as
worker/local/rabbitmq_node.py installs rabbitmq-server) driven by Playwright, against one
`invoice-worker console` process per module, the session's database and its shared worker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import ROOT, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TOKEN_NAME, TOKEN_SECRET = "ops-alice", f"secret-{uuid.uuid4().hex}"


def ensure_chromium() -> str:
    if not os.path.exists(CHROMIUM):
        if shutil.which("apt-get") is None:
            pytest.fail("chromium is missing and apt-get is not there to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env=env, capture_output=True)
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConsoleProcess:
    def __init__(self, urls: dict[str, str], logdir: Path, token: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logdir / f"console-{self.port}.log"
        env = {**os.environ, **urls, "CONSOLE_PORT": str(self.port), "CONSOLE_ADDRESS": "127.0.0.1"}
        env.pop("CONSOLE_TOKEN", None)
        if token:
            env["CONSOLE_TOKEN"] = token
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "console"], cwd=ROOT, env=env,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.answers, 30, what="the console to answer")

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the console exited:\n{self.log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(self.url + "/login", timeout=1).read()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def console(urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleProcess]:
    proc = ConsoleProcess(urls, tmp_path_factory.mktemp("console"), f"{TOKEN_NAME}:{TOKEN_SECRET},other:another-secret")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Watched:
    """A page whose dialogs, console errors and page errors are collected: a script that ran, or
    one that the Content-Security-Policy blocked, shows up here."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))


@pytest.fixture
def page(browser: Any, console: ConsoleProcess) -> Iterator[Watched]:
    context = browser.new_context(base_url=console.url)
    context.set_default_timeout(10_000)
    watched = Watched(context.new_page())
    yield watched
    context.close()


def sign_in(page: Any, secret: str = TOKEN_SECRET) -> None:
    page.goto("/login")
    page.fill("input[name=token]", secret)
    page.click("button[type=submit]")
    page.wait_for_url("**/")
