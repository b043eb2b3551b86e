"""examples/spa/ in a real browser (Debian's chromium, driven by Playwright): the refresh token in an HttpOnly
cookie, end to end. jwtauth, the example API and the page each run on their own 127.0.0.1 port, so they are
three origins of one site, as in a same-site deployment; a fourth port serves a page that jwtauth must refuse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import jwt
import pytest
from playwright.sync_api import Browser, BrowserContext, Error, Page, Response, expect, sync_playwright

from .conftest import PASSWORD, stop_server, table_counts
from .issuer import issuer_env, start_issuer
from .services import free_port, require_service

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; `make test` installs it. Playwright downloads nothing.
# Without the background-networking flags Chromium dials out at start, which a closed network refuses.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# A page on another origin that posts a login form to jwtauth as soon as it loads (login CSRF).
EVIL_PAGE = """<!doctype html><form method="post" action="{auth}/login">
<input name="email" value="alice@example.com"><input name="password" value="{password}"></form>
<script>document.forms[0].submit()</script>"""


@pytest.fixture(autouse=True, scope="module")
def chromium() -> None:
    """Every test here needs Debian's chromium: skipped, saying why, where it is missing (failed in a strict run)."""
    if not CHROMIUM.exists():
        require_service("chromium", f"no {CHROMIUM} for tests/test_spa.py; `make test` installs it when run as root")


@dataclass(frozen=True)
class Site:
    auth: str  # jwtauth
    api: str  # examples/resource_server.py
    spa: str  # examples/spa/, the allowed origin
    evil: str  # a page on an origin that jwtauth does not list
    database: Path

    @property
    def page(self) -> str:
        return f"{self.spa}/?auth={self.auth}&api={self.api}"


def serve(args: list[str], health: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server process and wait until `health` answers 200."""
    process = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(health, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.05)
    stop(process)
    raise RuntimeError(f"{args} did not answer at {health}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, keys_template: Path) -> Iterator[Site]:
    spa_port, evil_port = free_port(), free_port()
    spa, evil = f"http://127.0.0.1:{spa_port}", f"http://127.0.0.1:{evil_port}"
    env = issuer_env(tmp_path_factory.mktemp("spa"), keys_template, CORS_ORIGINS=spa)
    server, _ = start_issuer(env)
    evil_root = tmp_path_factory.mktemp("evil")
    (evil_root / "index.html").write_text(EVIL_PAGE.format(auth=server.url, password=PASSWORD))
    (evil_root / "blank.html").write_text("<!doctype html><title>another origin</title>")
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    static = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory"]
    processes = []
    try:
        processes.append(serve([*static, str(ROOT / "examples" / "spa"), str(spa_port)], f"{spa}/index.html"))
        processes.append(serve([*static, str(evil_root), str(evil_port)], f"{evil}/index.html"))
        uvicorn = [sys.executable, "-m", "uvicorn", "--factory", "examples.resource_server:create_app"]
        processes.append(
            serve(
                [*uvicorn, "--host", "127.0.0.1", "--port", str(api_port)],
                f"{api}/health",
                {"JWTAUTH_ISSUER": server.url, "API_CORS_ORIGINS": spa},
            )
        )
        yield Site(server.url, api, spa, evil, Path(env["JWTAUTH_DATABASE"]))
    finally:
        for process in processes:
            stop(process)
        stop_server(server)


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile: its own cookie jar and storage, shared by its tabs."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    yield context
    context.close()


def open_app(context: BrowserContext, site: Site, status: str = "Logged out") -> Page:
    page = context.new_page()
    page.goto(site.page)
    expect(page.locator("#status")).to_have_text(status)
    return page


def log_in(page: Page) -> None:
    page.fill("#email", "alice@example.com")
    page.fill("#password", PASSWORD)
    page.click("#login")
    expect(page.locator("#status")).to_have_text("Logged in as alice@example.com")


def refresh_cookie(context: BrowserContext) -> str:
    """The refresh token in the browser's cookie jar, as only the browser (and this test) can read it."""
    cookies = [cookie for cookie in context.cookies() if cookie["name"] == "jwtauth_refresh"]
    assert len(cookies) == 1, cookies
    return cookies[0]["value"]


def assert_out_of_reach_of_scripts(page: Page, token: str) -> None:
    """The page's scripts see no cookie at all, and no storage holds the token."""
    cookie, local, session = page.evaluate(
        "[document.cookie, JSON.stringify({...localStorage}), JSON.stringify({...sessionStorage})]"
    )
    assert (cookie, local, session) == ("", "{}", "{}")
    assert token not in page.content()


def sid_in(page: Page) -> str:
    token = page.evaluate("accessToken")
    return str(jwt.decode(token, options={"verify_signature": False})["sid"])


def test_log_in_call_the_api_and_stay_logged_in_across_a_reload(context: BrowserContext, site: Site) -> None:
    page = open_app(context, site)

    log_in(page)
    first = refresh_cookie(context)
    page.click("#call-api")
    expect(page.locator("#output")).to_contain_text("GET /orders: 200")
    page.reload()
    expect(page.locator("#status")).to_have_text("Logged in as alice@example.com")  # by the cookie alone
    page.click("#call-api")

    expect(page.locator("#output")).to_contain_text('"email": "alice@example.com"')
    second = refresh_cookie(context)
    assert second != first  # the reload rotated the cookie
    assert_out_of_reach_of_scripts(page, first)
    assert_out_of_reach_of_scripts(page, second)
    cookie = next(cookie for cookie in context.cookies() if cookie["name"] == "jwtauth_refresh")
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"], cookie["path"]) == (True, "Strict", False, "/")
    assert cookie["domain"] == "127.0.0.1"  # host-only: no Domain attribute


def is_refresh_post(answer: Response) -> bool:
    return answer.url.endswith("/refresh") and answer.request.method == "POST"  # not a preflight


def test_two_tabs_refreshing_at_once_converge_on_one_token(context: BrowserContext, site: Site) -> None:
    first = open_app(context, site)
    log_in(first)
    second = open_app(context, site, "Logged in as alice@example.com")  # the shared cookie logs it in
    answers: list[Response] = []
    context.on("response", lambda answer: answers.append(answer) if is_refresh_post(answer) else None)
    for _ in range(5):  # until the two requests leave with the same cookie: a race, not one after the other
        answers.clear()
        start = time.time() * 1000 + 300  # both tabs fire at this instant (ms since the epoch)
        for page in (first, second):
            page.evaluate(
                "at => { window.raced = new Promise(r => setTimeout(() => refresh().then(r), at - Date.now())) }", start
            )
        assert [page.evaluate("window.raced") for page in (first, second)] == [True, True]
        presented = {answer.request.header_value("cookie") for answer in answers}
        if len(answers) == 2 and len(presented) == 1:
            break

    assert len(answers) == 2 and len(presented) == 1, "the two tabs never raced"
    assert len({answer.header_value("set-cookie") for answer in answers}) == 1  # one next token for both: no fork
    assert sid_in(first) == sid_in(second)
    for page in (first, second):
        page.click("#call-api")
        expect(page.locator("#output")).to_contain_text("GET /orders: 200")
        page.reload()
        expect(page.locator("#status")).to_have_text("Logged in as alice@example.com")
        assert_out_of_reach_of_scripts(page, refresh_cookie(context))


def test_log_out_and_stay_logged_out_across_a_reload(context: BrowserContext, site: Site) -> None:
    page = open_app(context, site)
    log_in(page)
    token = refresh_cookie(context)

    page.click("#logout")
    expect(page.locator("#status")).to_have_text("Logged out")
    page.reload()

    expect(page.locator("#status")).to_have_text("Logged out")
    assert [cookie for cookie in context.cookies() if cookie["name"] == "jwtauth_refresh"] == []
    answer = httpx.post(f"{site.auth}/refresh", json={"refresh_token": token})
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_grant")  # the session has ended


def test_a_page_on_another_origin_posting_a_login_form_gets_no_cookie(context: BrowserContext, site: Site) -> None:
    before = table_counts(site.database)
    page = context.new_page()

    with page.expect_response(f"{site.auth}/login") as answer:
        page.goto(f"{site.evil}/index.html")

    assert answer.value.status == 403
    assert json.loads(answer.value.text()) == {"error": "invalid_request", "error_description": "origin not allowed"}
    assert context.cookies() == []
    assert table_counts(site.database) == before


def test_a_script_on_another_origin_cannot_read_a_token_response(context: BrowserContext, site: Site) -> None:
    page = context.new_page()
    page.goto(f"{site.evil}/blank.html")
    body = json.dumps({"email": "alice@example.com", "password": PASSWORD})

    with pytest.raises(Error, match="Failed to fetch"):
        page.evaluate(
            """([url, body]) => fetch(url, {method: "POST", credentials: "include",
                   headers: {"Content-Type": "application/json"}, body}).then(r => r.json())""",
            [f"{site.auth}/login", body],
        )
    assert context.cookies() == []
