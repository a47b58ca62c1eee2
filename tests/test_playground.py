"""The playground page in a real browser (system Chromium driven by Playwright) against a real `reprmerge serve`.

Every number the page shows is checked against a direct HTTP call to the same server, and fingerprints
against the library's canonical preference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from reprmerge_bench.browser import launch, missing, open_playground, settle
from reprmerge_core.preference import canonical_preference
from tests.helpers import make_random_bundle
from tests.test_service_http import ServerProcess

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"browser tests: {missing()}")
if missing() is None:
    from playwright.sync_api import Browser, BrowserContext, Page, Request, Route, expect, sync_playwright

TASKS = ("alpha", "beta", "gamma")
KEY = "playground-test-key"
TIMEOUT_MS = 30_000
needs_curl = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="no curl: apt-get install -y curl (`make test` does)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Path:
    generator = torch.Generator().manual_seed(5)
    return make_random_bundle(tmp_path_factory.mktemp("play") / "bundle", tiny_backbone_dir, generator)


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(bundle, tmp_path_factory.mktemp("logs") / "play.log", "--max-inputs", "4")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(bundle, tmp_path_factory.mktemp("logs") / "keyed.log", "--api-key", KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


class Session:
    """A page in a fresh context that records every request and console error; requests off 127.0.0.1 are aborted."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.requests: list[Request] = []
        context.route("**/*", self._route)
        self.page: Page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r))

    def _route(self, route: Route) -> None:
        self.urls.append(route.request.url)
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            route.abort()

    def predict_bodies(self) -> list[dict[str, Any]]:
        return [body for r in self.requests if r.method == "POST" and r.url.endswith("/v1/predict")
                and (body := r.post_data_json) is not None]


@pytest.fixture
def session(browser: Browser) -> Iterator[Session]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    yield Session(context)
    context.close()


def _open(session: Session, url: str) -> Page:
    open_playground(session.page, url, TIMEOUT_MS)
    return session.page


def _shown_predictions(page: Page) -> list[dict[str, dict[str, Any]]]:
    """Per input, per task: the label and the percentages the page shows."""
    return page.eval_on_selector_all("#prediction-list article", """articles => articles.map(a =>
        Object.fromEntries([...a.querySelectorAll('.task')].map(t => [t.dataset.task, {
            label: t.querySelector('.label').textContent,
            probabilities: Object.fromEntries([...t.querySelectorAll('li')].map(li =>
                [li.dataset.class, li.querySelector('.p').textContent])),
        }])))""")


def _as_shown(predictions: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    """An API answer's predictions formatted as the page shows them (percent, one decimal)."""
    return [{task: {"label": p["label"], "probabilities": {c: f"{100 * v:.1f}%" for c, v in p["probabilities"].items()}}
             for task, p in row.items()} for row in predictions]


def _texts(page: Page) -> list[str]:
    return [line for line in page.input_value("#texts").split("\n") if line.strip()]


def test_page_loads_offline_with_the_bundle_identity_and_no_console_errors(
        server: ServerProcess, session: Session) -> None:
    page = _open(session, server.url)
    assert page.url == f"{server.url}/playground/"
    expect(page.locator("#heat polygon")).to_have_count(12 * 12, timeout=TIMEOUT_MS)  # the simplex heat map
    info = httpx.get(f"{server.url}/v1/info").json()
    identity = page.inner_text("#identity")
    for shown in (info["bundle_id"], info["merge"]["method"], str(info["correction"]["beta"]), info["device"],
                  *(label for task in info["tasks"] for label in (task["name"], *task["labels"]))):
        assert shown in identity
    uniform = canonical_preference([1, 1, 1], TASKS)
    assert page.inner_text("#fingerprint") == page.inner_text("#tradeoff-fingerprint") == uniform.fingerprint
    assert page.locator("#sliders input[type=range]").count() == 3
    assert session.urls and all(url.startswith(f"{server.url}/") for url in session.urls), session.urls
    assert session.errors == []
    assert f"playground: {server.url}/playground/" in server.log.read_text()  # `reprmerge serve` prints the URL
    for width, height in ((1280, 800), (390, 844)):  # desktop and phone: nothing wider than the screen
        page.set_viewport_size({"width": width, "height": height})
        assert page.evaluate("document.documentElement.scrollWidth") <= width


def test_a_slider_at_one_hot_shows_the_one_hot_loss_and_the_apis_predictions(
        server: ServerProcess, session: Session) -> None:
    page = _open(session, server.url)
    page.focus("#range-1")
    page.keyboard.press("End")  # the keyboard moves the slider to 100%: beta's one-hot preference
    one_hot = canonical_preference({"beta": 1}, TASKS)
    expect(page.locator("#tradeoff-fingerprint")).to_have_text(one_hot.fingerprint)
    expect(page.locator("#fingerprint")).to_have_text(one_hot.fingerprint)
    settle(page, TIMEOUT_MS)
    assert page.inner_text("#canonical") == "alpha 0 · beta 1 · gamma 0"

    want = httpx.post(f"{server.url}/v1/tradeoff", json={"preference": {"beta": 1}}).json()["results"][0]["tasks"]
    rows = page.eval_on_selector_all("#tradeoff-table tbody tr", """rows => Object.fromEntries(rows.map(r =>
        [r.dataset.task, Object.fromEntries(['loss', 'best', 'kept'].map(k =>
            [k, r.querySelector('.' + k).innerText.trim()]))]))""")
    assert rows["beta"]["loss"] == rows["beta"]["best"] and rows["beta"]["kept"] == "100.0%"
    for task in TASKS:
        assert float(rows[task]["loss"]) == pytest.approx(want[task]["loss"], rel=5e-4)
        assert float(rows[task]["best"]) == pytest.approx(want[task]["best"], rel=5e-4)
    assert float(rows["alpha"]["loss"]) > float(rows["alpha"]["best"])  # a task at weight 0 loses quality

    answer = httpx.post(f"{server.url}/v1/predict", json={"texts": _texts(page), "preference": [0, 1, 0]}).json()
    assert answer["results"][0]["fingerprint"] == one_hot.fingerprint
    assert _shown_predictions(page) == _as_shown(answer["results"][0]["predictions"])


def _vertex(page: Page, task: int) -> tuple[float, float]:
    """Screen position of a task's corner of the triangle."""
    x, y = page.evaluate("""k => {
        const box = document.getElementById('simplex');
        const corner = box.querySelector('#frame polygon').points[k];
        const p = new DOMPoint(corner.x, corner.y).matrixTransform(box.getScreenCTM());
        return [p.x, p.y];
    }""", task)
    return x, y


def test_the_triangle_follows_clicks_drags_and_arrow_keys_and_every_control_is_labelled(
        server: ServerProcess, session: Session) -> None:
    page = _open(session, server.url)
    page.mouse.click(*_vertex(page, 0))
    expect(page.locator("#canonical")).to_have_text("alpha 1 · beta 0 · gamma 0")
    page.mouse.move(*_vertex(page, 0))
    page.mouse.down()
    page.mouse.move(*_vertex(page, 1), steps=8)
    page.mouse.up()
    expect(page.locator("#canonical")).to_have_text("alpha 0 · beta 1 · gamma 0")
    settle(page, TIMEOUT_MS)
    assert page.inner_text("#fingerprint") == canonical_preference({"beta": 1}, TASKS).fingerprint
    assert page.eval_on_selector("#marker", "m => [m.cx.baseVal.value, m.cy.baseVal.value]") == [14, 208]

    page.focus("#simplex")
    page.keyboard.press("ArrowRight")  # from the beta corner toward gamma's
    expect(page.locator("#canonical")).not_to_have_text("alpha 0 · beta 1 · gamma 0")
    shares = page.evaluate("() => [0, 1, 2].map(i => document.getElementById('range-' + i).valueAsNumber)")
    assert shares[0] == 0 and 0 < shares[2] < 10 < shares[1]

    unnamed = page.eval_on_selector_all("#main :is(input, select, textarea, button, [tabindex])", """els => els
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                     && !e.getAttribute('aria-labelledby') && !e.textContent.trim())
        .map(e => e.outerHTML.slice(0, 80))""")
    assert unnamed == []


def test_two_pinned_preferences_come_from_one_predict_request(server: ServerProcess, session: Session) -> None:
    page = _open(session, server.url)
    page.get_by_role("button", name="Only alpha").click()
    page.click("#pin")
    settle(page, TIMEOUT_MS)
    before = len(session.predict_bodies())
    page.get_by_role("button", name="Favour gamma").click()
    page.click("#pin")
    expect(page.locator("#compare-columns .column")).to_have_count(2)
    settle(page, TIMEOUT_MS)

    compared = [b for b in session.predict_bodies()[before:] if "preferences" in b]
    assert len(compared) == 1 and len(compared[0]["preferences"]) == 2, compared
    prefs: list[dict[str, float]] = [{"alpha": 1, "beta": 0, "gamma": 0}, {"alpha": 0.25, "beta": 0.25, "gamma": 0.5}]
    assert compared[0]["preferences"] == prefs
    fingerprints = page.eval_on_selector_all("#compare-columns .column", "cs => cs.map(c => c.dataset.fingerprint)")
    assert fingerprints == [canonical_preference(p, TASKS).fingerprint for p in prefs]

    answer = httpx.post(f"{server.url}/v1/predict", json={"texts": _texts(page), "preferences": prefs}).json()
    shown = page.eval_on_selector_all("#compare-columns .column", """cs => cs.map(c =>
        [...c.querySelectorAll('ol li')].map(li => Object.fromEntries([...li.querySelectorAll('p[data-task]')].map(p =>
            [p.dataset.task, [p.querySelector('.label').textContent, p.querySelector('.p').textContent.trim()]]))))""")
    assert shown == [[{t: [p["label"], f"{100 * p['probabilities'][p['label']]:.1f}%"] for t, p in row.items()}
                      for row in result["predictions"]] for result in answer["results"]]
    assert page.is_disabled("#pin") and page.get_by_role("button", name="Unpin").count() == 2  # this one is pinned


@needs_curl
def test_the_copied_curl_and_python_calls_answer_what_the_page_shows(server: ServerProcess, session: Session) -> None:
    page = _open(session, server.url)
    page.fill("#texts", "it's a 'quoted' line\nwhat time is it? $HOME `date`")
    page.fill("#share-0", "20")  # a typed share: the others share the remaining 80% as before (40/40)
    settle(page, TIMEOUT_MS)
    expect(page.locator("#canonical")).to_have_text("alpha 0.2 · beta 0.4 · gamma 0.4")

    page.click("button[data-copy=curl]")
    command = page.evaluate("navigator.clipboard.readText()")
    assert command == page.inner_text("#curl")
    ran = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True, timeout=60)
    curl = json.loads(ran.stdout)
    result = curl["results"][0]
    want = canonical_preference([1, 2, 2], TASKS).fingerprint
    assert result["fingerprint"] == page.inner_text("#fingerprint") == want
    assert _shown_predictions(page) == _as_shown(result["predictions"])

    page.click("button[data-copy=python]")
    code = page.evaluate("navigator.clipboard.readText()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["results"] == curl["results"]


def test_a_refused_request_shows_its_problem_detail(server: ServerProcess, session: Session) -> None:
    page = _open(session, server.url)
    page.fill("#texts", "\n".join(f"line {i}" for i in range(5)))  # the server takes at most 4 inputs
    want = httpx.post(f"{server.url}/v1/predict", json={"texts": [f"line {i}" for i in range(5)]}).json()
    expect(page.locator("#error")).to_contain_text(f"413 {want['title']}: {want['detail']} (field texts)")
    page.fill("#texts", "line 0")
    expect(page.locator("#error")).to_be_hidden()


@needs_curl
def test_with_an_api_key_the_page_shows_the_401_detail_then_works_with_the_key(
        keyed: ServerProcess, session: Session) -> None:
    page = session.page
    page.goto(f"{keyed.url}/")  # the page itself is public; its API calls are not
    refused = httpx.get(f"{keyed.url}/v1/info").json()
    expect(page.locator("#auth-detail")).to_have_text(refused["detail"])
    expect(page.locator("#error")).to_contain_text(f"401 {refused['title']}: {refused['detail']}")
    assert page.is_hidden("#main")

    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    expect(page.locator("#error")).to_contain_text("401")
    assert page.is_hidden("#main")

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#prediction-list article")).not_to_have_count(0)
    settle(page, TIMEOUT_MS)
    assert page.is_hidden("#error") and page.is_hidden("#auth")
    assert page.inner_text("#fingerprint") == canonical_preference([1, 1, 1], TASKS).fingerprint
    assert page.evaluate("localStorage.length + sessionStorage.length + document.cookie.length") == 0
    command = page.inner_text("#curl")
    assert KEY not in command and KEY not in page.inner_text("#python") and "$REPRMERGE_API_KEY" in command
    curl = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True, timeout=60,
                          env={**os.environ, "REPRMERGE_API_KEY": KEY})
    assert json.loads(curl.stdout)["results"][0]["fingerprint"] == page.inner_text("#fingerprint")
