"""The dashboard in a real browser (Debian's headless Chromium via Playwright) against the real
stack: API process + Celery worker process + Redis + PostgreSQL.

One stack serves the whole module (the worker runs one job at a time, so jobs run in turn):
sign in, submit an NF4 job on stories260K through the form and watch it progress and succeed
without a reload, see a failed job's error, cancel a running job, and check that another tenant
sees nothing and that the API key never reaches a page or a cookie. Every response of every page is
watched (none may be a 5xx) and every EventSource is recorded, so a live stream that fails cannot hide
behind the polling fallback. At 390 px wide every column of the list stays on screen. Screenshots at
1280 and 390 px are saved under the test artefacts.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import ARTIFACTS, STORIES, auth, fresh_redis_url, new_key, running_service, truncate_all


pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("QAAS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ARTIFACTS / "dashboard"
TIMEOUT_MS = 90_000
WIDE, NARROW = {"width": 1280, "height": 900}, {"width": 390, "height": 844}

# Every EventSource a page opens, with what happened on it: window.__sse = [{url, opened, errors, events}].
RECORD_EVENT_SOURCES = """(() => {
  const Native = window.EventSource;
  if (!Native) return;
  window.__sse = [];
  class Recorded extends Native {
    constructor(url, options) {
      super(url, options);
      const rec = { url: String(url), opened: 0, errors: 0, events: {} };
      window.__sse.push(rec);
      super.addEventListener("open", () => { rec.opened += 1; });
      super.addEventListener("error", () => { rec.errors += 1; });
      this.__rec = rec;
    }
    addEventListener(type, listener, options) {
      const rec = this.__rec;
      return super.addEventListener(type, function (ev) {
        if (type !== "open" && type !== "error") rec.events[type] = (rec.events[type] || 0) + 1;
        return listener.call(this, ev);
      }, options);
    }
  }
  window.EventSource = Recorded;
})();"""


@pytest.fixture(scope="module")
def live(pg_url, tmp_path_factory):
    """API + worker for the module, and two tenants' keys."""
    tmp = tmp_path_factory.mktemp("dashboard")
    try:
        with running_service(tmp, "dashboard", database_url=pg_url, broker_url=fresh_redis_url()) as (settings, stack, url):
            yield type("Live", (), {"url": url, "settings": settings, "tmp": tmp, "stack": stack,
                                    "alice": new_key(settings, "alice"), "mallory": new_key(settings, "mallory")})
    finally:
        truncate_all(pg_url)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = (f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install -y chromium) "
                   "or set QAAS_CHROMIUM; Playwright's own browser download is not used")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Session:
    """A signed-in browser context; remembers every page's HTML to check for the key at the end."""

    def __init__(self, browser, base: str, key: str, viewport: dict = WIDE) -> None:
        self.context = browser.new_context(base_url=base, viewport=viewport)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.add_init_script(RECORD_EVENT_SOURCES)
        self.server_errors: list[str] = []
        self.context.on("response", lambda r: r.status >= 500 and self.server_errors.append(f"{r.status} {r.url}"))
        self.key = key
        self.html: list[str] = []
        self.page = self.context.new_page()
        self.page.goto("/dashboard/jobs")
        assert "/dashboard/login" in self.page.url
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url("**/dashboard/jobs")
        self.keep()

    def keep(self, page=None) -> None:
        self.html.append((page or self.page).content())

    def assert_no_server_errors(self) -> None:
        assert not self.server_errors, f"requests of the pages answered 5xx: {self.server_errors}"

    def assert_key_never_exposed(self) -> None:
        for html in self.html:
            assert self.key not in html
        for c in self.context.cookies():
            assert self.key not in c["value"] and self.key[5:25] not in c["value"]
            if c["name"] == "qaas_session":
                assert c["httpOnly"] and c["sameSite"] == "Strict"

    def submit(self, model: str, *, advanced: str = "", method_label: str = "bitsandbytes NF4 (4-bit)") -> str:
        page = self.page
        page.goto("/dashboard/jobs/new")
        page.get_by_label("Hub model id or local path").fill(model)
        page.get_by_label("Quantization method").select_option(label=method_label)
        page.get_by_label("Compute dtype (bitsandbytes 4-bit)").select_option("float32")
        if advanced:
            page.get_by_label("Extra request fields as JSON (merged into the request)").fill(advanced)
        self.keep()
        page.get_by_role("button", name="Submit job").click()
        page.wait_for_url("**/dashboard/jobs/*-*?notice=submitted")
        self.keep()
        return page.url.split("/dashboard/jobs/")[1].split("?")[0]

    def close(self) -> None:
        self.context.close()


def _shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _status(page) -> str:
    return page.locator("#job-status").inner_text().strip()


def _streams(page, path: str) -> list[dict]:
    return [r for r in page.evaluate("window.__sse || []") if path in r["url"]]


def assert_followed_live(page, path: str, kinds: tuple[str, ...]) -> None:
    """The page's EventSource on `path` opened, delivered events of `kinds`, and never failed over to polling."""
    streams = _streams(page, path)
    assert streams, f"no EventSource on {path}: {page.evaluate('window.__sse || []')}"
    assert all(r["opened"] >= 1 and r["errors"] == 0 for r in streams), streams
    assert sum(r["events"].get(k, 0) for r in streams for k in kinds) > 0, streams
    assert "polling" not in page.locator("#live-state").inner_text()


def assert_fits(page, width: int) -> dict:
    """No sideways scrolling, and every cell of the jobs list shown whole on screen under its label."""
    got = page.evaluate("""(width) => {
      const out = {overflow: document.documentElement.scrollWidth - width, rows: 0, off: [], unlabelled: [], wide: []};
      for (const el of document.querySelectorAll('body *')) {  // what sticks out, for the message
        const r = el.getBoundingClientRect();
        if (r.right > width + 0.5 && out.wide.length < 8)
          out.wide.push(el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + '.' + el.className + ' ' + Math.round(r.right));
      }
      for (const tr of document.querySelectorAll('tr.job-row')) {
        out.rows += 1;
        for (const td of tr.querySelectorAll('td')) {
          if (!td.textContent.trim() && !td.querySelector('button, progress')) continue;
          const r = td.getBoundingClientRect();
          if (r.width === 0 || r.height === 0 || r.left < 0 || r.right > width + 0.5)
            out.off.push([td.dataset.label, Math.round(r.left), Math.round(r.right)]);
          const label = getComputedStyle(td, '::before').content;
          if (td.dataset.label && label !== '"' + td.dataset.label + '"') out.unlabelled.push(td.dataset.label);
        }
      }
      return out;
    }""", width)
    assert got["overflow"] <= 0, f"the page scrolls sideways by {got['overflow']} px: {got['wide']}"
    assert not got["off"], f"cells outside the {width} px screen: {got['off'][:10]}"
    return got


def test_submit_watch_progress_live_and_see_the_result(browser, live):
    alice = Session(browser, live.url, live.alice)
    try:
        listing = alice.context.new_page()
        listing.goto("/dashboard/jobs")
        listing.evaluate("window.__notReloaded = true")
        page = alice.page
        jid = alice.submit(str(STORIES))
        page.evaluate("window.__notReloaded = true")
        events_at_load = page.locator("#events-body tr").count()

        # Follow the page, without reloading it, until the job ends; record what it showed.
        seen: list[tuple] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            snap = page.evaluate("""() => ({
                status: document.querySelector('#job-status')?.textContent.trim(),
                stage: document.querySelector('#progress-label')?.textContent.trim() || null,
                value: document.querySelector('#job-progress')?.value ?? null,
                text: document.querySelector('#progress-text')?.textContent.trim(),
                events: document.querySelectorAll('#events-body tr').length,
                bars: document.querySelectorAll('#error-chart rect.bar').length})""")
            if not seen or tuple(snap.values()) != seen[-1]:
                seen.append(tuple(snap.values()))
            if snap["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        assert page.evaluate("window.__notReloaded === true"), "the job page reloaded"
        statuses = [s[0] for s in seen]
        assert statuses[-1] == "succeeded", (seen, live.stack.procs[-1].log()[-3000:])
        assert "running" in statuses or len(seen) >= 3, seen
        assert len(set(seen)) >= 3, f"the page did not change while the job ran: {seen}"
        assert seen[-1][4] > events_at_load, "no event arrived live"
        stages_seen = {s[1] for s in seen if s[1]}
        progress_values = {s[2] for s in seen if s[2] is not None}
        assert stages_seen or progress_values, seen

        # The result, rendered in place.
        page.locator("#result").wait_for()
        for sel in ("#size-before", "#size-after", "#compression", "#ppl-before", "#ppl-after"):
            assert page.locator(sel).inner_text().strip() not in ("", "–"), sel
        assert "×" in page.locator("#compression").inner_text()
        assert page.locator("#result").get_by_role("link", name="model.safetensors", exact=True).count() == 1
        assert page.locator(".timeline li").count() >= 4
        assert page.locator("#error-chart rect.bar").count() > 0, "no per-layer error chart"
        assert page.evaluate("window.__notReloaded === true")
        # It all arrived through the job's live stream, not the polling fallback.
        assert_followed_live(page, f"/dashboard/jobs/{jid}/events", ("status", "stage", "progress"))
        alice.keep()
        page.reload()  # a fresh render shows the same result (and makes a clean screenshot)
        page.locator("#error-chart rect.bar").first.wait_for()
        alice.keep()
        _shot(page, "job-succeeded.png")
        assert page.locator("h1").inner_text() == f"{STORIES.parent.name}/{STORIES.name}"


        # The list, opened before the job existed, got the row and its final state live.
        row = listing.locator(f"#job-{jid}")
        row.wait_for()
        row.locator(".badge-succeeded").wait_for()
        assert listing.evaluate("window.__notReloaded === true"), "the list reloaded"
        assert_followed_live(listing, "/dashboard/jobs/stream", ("job",))
        assert_fits(listing, WIDE["width"])
        for cell, shown in (("Size after", "KiB"), ("Compression", "×"), ("Perplexity Δ", "%")):
            assert shown in row.locator(f"td[data-label='{cell}']").inner_text(), cell
        alice.keep(listing)

        # A downloaded file is the engine's output.
        with page.expect_download() as dl:
            page.locator("#result").get_by_role("link", name="config.json", exact=True).click()
        assert b"quantization_config" in Path(dl.value.path()).read_bytes()
        # ... and so is the archive of them all
        with page.expect_download() as dl:
            page.locator("#download-all").click()
        import tarfile

        with tarfile.open(dl.value.path()) as tar:
            names = {m.name.split("/", 1)[1] for m in tar.getmembers()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
        alice.assert_key_never_exposed()
        alice.assert_no_server_errors()
    finally:
        alice.close()


def test_submit_form_shows_validation_errors_by_their_fields(browser, live):
    alice = Session(browser, live.url, live.alice)
    try:
        page = alice.page
        page.goto("/dashboard/jobs/new")
        page.get_by_label("Hub model id or local path").fill(str(STORIES))
        page.get_by_label("Quantization method").select_option("gptq")
        assert page.get_by_label("Calibration dataset (GPTQ, AWQ)").is_visible()
        assert not page.get_by_label("Compute dtype (bitsandbytes 4-bit)").is_visible()
        page.get_by_label("Group size (GPTQ, AWQ)").fill("0")
        page.get_by_role("button", name="Submit job").click()
        summary = page.locator("#form-errors")
        summary.wait_for()
        assert page.evaluate("document.activeElement.id") == "form-errors"  # focus moves to the errors
        text = summary.inner_text()
        assert "quantization_config.group_size: must be -1" in text
        assert page.get_by_label("Group size (GPTQ, AWQ)").get_attribute("aria-invalid") == "true"
        assert page.get_by_label("Hub model id or local path").input_value() == str(STORIES)  # kept
        alice.keep()
        _shot(page, "submit-errors.png")
        alice.assert_key_never_exposed()
        alice.assert_no_server_errors()
    finally:
        alice.close()


def test_failed_job_shows_its_error_and_stage(browser, live):
    bad = live.tmp / "pickle-model"
    bad.mkdir(exist_ok=True)
    shutil.copy(STORIES / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    alice = Session(browser, live.url, live.alice)
    try:
        page = alice.page
        alice.submit(str(bad))
        page.locator("#job-error").wait_for()
        assert _status(page) == "failed"
        error = page.locator("#job-error").inner_text()
        assert "source_rejected" in error
        assert "resolve" in page.locator("#error-h").inner_text()
        assert page.get_by_role("button", name="Retry as a new job").is_visible()
        alice.keep()
        _shot(page, "job-failed.png")
        alice.assert_key_never_exposed()
        alice.assert_no_server_errors()
    finally:
        alice.close()


def test_cancel_a_running_job_and_the_live_list(browser, live):
    alice = Session(browser, live.url, live.alice)
    try:
        page = alice.page
        # Many evaluation windows keep the job busy long enough to watch it and cancel it.
        jid = alice.submit(str(STORIES), advanced='{"options": {"eval_max_windows": 400}}')
        page.goto("/dashboard/jobs")
        page.evaluate("window.__notReloaded = true")
        row = page.locator(f"#job-{jid}")
        row.locator(".badge-running").wait_for()
        first = row.locator(".progress-cell").inner_text()
        deadline = time.monotonic() + 60
        while row.locator(".progress-cell").inner_text() == first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert row.locator(".progress-cell").inner_text() != first, "the list row did not update live"
        # wait until evaluation runs, for a screenshot with a live progress bar and message
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                "evaluate" in row.locator(".progress-cell").inner_text()
                and float(row.get_attribute("data-progress") or 0) > 0.03):
            time.sleep(0.2)
        assert page.evaluate("window.__notReloaded === true")
        assert row.locator("[data-tick=elapsed]").inner_text() not in ("", "–")
        # a finished NF4 job of the same model went before: the whole job's time left is estimated
        assert row.locator("[data-tick=eta]").inner_text().startswith("~")
        assert_fits(page, WIDE["width"])
        alice.keep()
        _shot(page, "jobs-list.png")

        # Pages in a browser without EventSource fall back to polling the small JSON endpoints.
        polled = alice.context.new_page()
        polled.add_init_script("window.EventSource = undefined")
        polled.goto("/dashboard/jobs")
        polled.locator("#live-state", has_text="polling").wait_for()
        polled_job = alice.context.new_page()
        polled_job.add_init_script("window.EventSource = undefined")
        polled_job.goto(f"/dashboard/jobs/{jid}")
        polled_job.locator("#live-state", has_text="polling").wait_for()
        polled_job.evaluate("window.__notReloaded = true")

        row.get_by_role("link").first.click()
        page.wait_for_url(f"**/dashboard/jobs/{jid}")
        page.evaluate("window.__notReloaded = true")
        assert page.locator("#error-chart rect.bar").count() > 0
        _shot(page, "job-running.png")
        page.get_by_role("button", name="Cancel job").click()
        page.wait_for_url("**notice=cancel-requested")
        page.evaluate("window.__notReloaded = true")
        page.locator("#job-status", has_text="cancelled").wait_for(timeout=60_000)
        assert page.evaluate("window.__notReloaded === true"), "the cancelled state needed a reload"
        assert page.get_by_role("button", name="Retry as a new job").is_visible()
        polled.locator(f"#job-{jid} .badge-cancelled").wait_for(timeout=30_000)
        polled_job.locator("#job-status", has_text="cancelled").wait_for(timeout=30_000)
        assert polled_job.evaluate("window.__notReloaded === true")
        alice.keep()
        with httpx.Client(base_url=live.url, headers=auth(live.alice)) as c:
            assert c.get(f"/v1/jobs/{jid}").json()["status"] == "cancelled"
        assert_followed_live(page, f"/dashboard/jobs/{jid}/events", ("status",))
        alice.assert_key_never_exposed()
        alice.assert_no_server_errors()
    finally:
        alice.close()


def test_another_tenant_sees_none_of_these_jobs(browser, live):
    with httpx.Client(base_url=live.url, headers=auth(live.alice)) as c:
        alice_jobs = [j["id"] for j in c.get("/v1/jobs").json()["items"]]
    assert alice_jobs
    mallory = Session(browser, live.url, live.mallory)
    try:
        page = mallory.page
        assert page.locator("tr.job-row").count() == 0
        for jid in alice_jobs:
            assert jid not in page.content()
        resp = page.goto(f"/dashboard/jobs/{alice_jobs[0]}")
        assert resp.status == 404 and "Not found" in page.content()
        resp = page.goto(f"/dashboard/jobs/{alice_jobs[0]}/events")
        assert resp.status == 404
        mallory.keep()
        mallory.assert_key_never_exposed()
        for c in mallory.context.cookies():
            assert live.alice not in c["value"]
        resp = page.goto("/dashboard/jobz")  # mistyped: a page saying so, not JSON
        assert resp.status == 404 and resp.headers["content-type"].startswith("text/html")
        assert page.get_by_text("There is no page at").is_visible()
        page.goto("/dashboard/jobs")
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url("**/dashboard/login?notice=signed-out")
        page.goto("/dashboard/jobs")
        assert "/dashboard/login" in page.url
        mallory.assert_no_server_errors()
    finally:
        mallory.close()


def test_at_390_px_every_column_is_on_screen(browser, live):
    """A phone: the list is one card per job with every column's content, and no page scrolls sideways."""
    alice = Session(browser, live.url, live.alice, viewport=NARROW)
    try:
        page = alice.page
        page.goto("/dashboard/jobs")
        got = assert_fits(page, NARROW["width"])
        assert got["rows"] >= 3 and not got["unlabelled"], got  # the jobs of the tests before, each labelled
        _shot(page, "jobs-list-390.png")
        with httpx.Client(base_url=live.url, headers=auth(live.alice)) as c:
            jobs = c.get("/v1/jobs").json()["items"]
        for status in ("succeeded", "failed", "cancelled"):
            job = next(j for j in jobs if j["status"] == status)
            page.goto(f"/dashboard/jobs/{job['id']}")
            assert_fits(page, NARROW["width"])
            if status == "succeeded":
                _shot(page, "job-succeeded-390.png")
        page.goto("/dashboard/jobs/new")
        assert_fits(page, NARROW["width"])
        alice.assert_no_server_errors()
    finally:
        alice.close()
