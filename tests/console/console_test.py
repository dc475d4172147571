"""Drives the admin console in headless Chromium (Playwright over the Debian chromium-headless-shell).

Run by tests/console_e2e.rs with: BASE_URL, TOKEN (an owner token of org `acme`), ARTIFACT_DIR,
CHROMIUM (the browser binary). Signs in with a link, creates a project in us-east-1, takes its key
from the page, sends events with curl and sees them in the live debugger within 2 s, suppresses a
user and sees the user's next event marked suppressed, requests a deletion and watches it reach
`done`, and writes a screenshot of every page. Exits non-zero (with the reason) on any failure,
including an error or a Content-Security-Policy violation in the browser's console.
"""

import json
import os
import subprocess
import sys
import time

from playwright.sync_api import sync_playwright

BASE = os.environ["BASE_URL"]
TOKEN = os.environ["TOKEN"]
OTHER_TOKEN = os.environ["OTHER_TOKEN"]
ARTIFACTS = os.environ["ARTIFACT_DIR"]
CHROMIUM = os.environ["CHROMIUM"]
os.makedirs(ARTIFACTS, exist_ok=True)
facts = {}


def curl_batch(key, messages):
    subprocess.run(
        ["curl", "-sf", "-X", "POST", f"{BASE}/v1/batch", "-u", f"{key}:",
         "-H", "Content-Type: application/json", "-d", json.dumps({"batch": messages})],
        check=True, capture_output=True)


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def wait_connected(page):
    # Selectors, not wait_for_function: the console's CSP forbids evaluating strings as script.
    page.wait_for_selector("#live-state:has-text('Connected')", timeout=10_000)


def run(page):
    # Sign in with a link; the token leaves the address bar.
    page.goto(f"{BASE}/console/#token={TOKEN}")
    page.wait_for_selector("#health table", timeout=10_000)
    assert "token=" not in page.url, page.url
    shot(page, "1-overview")

    # New project in us-east-1: the key is shown once.
    page.click("text=New project")
    page.wait_for_selector("#new-project")
    page.fill("#project-name", "Console web")
    page.select_option("#project-region", "us-east-1")
    assert "cannot be changed later" in page.text_content("#new-project")
    page.click("#new-project button[type=submit]")
    page.wait_for_selector("#write-key")
    key = page.text_content("#write-key").strip()
    assert len(key) > 20, key
    snippet = page.text_content("#created")
    assert key in snippet and BASE in snippet, "the SDK snippets carry the key and this node's URL"
    shot(page, "2-new-project")

    # The live debugger shows events sent with curl within 2 s.
    page.click("#open-project")
    wait_connected(page)
    sent = time.monotonic()
    curl_batch(key, [{"type": "track", "userId": "alice", "event": "Signed Up", "messageId": "console-1"},
                     {"type": "identify", "userId": "bob", "traits": {"plan": "pro"}, "messageId": "console-2"}])
    page.wait_for_selector("#live-rows tr[data-message-id='console-2']", timeout=2_000)
    page.wait_for_selector("#live-rows tr[data-message-id='console-1']", timeout=2_000)
    facts["live_seconds"] = round(time.monotonic() - sent, 3)
    page.click("#live-rows tr[data-message-id='console-1']")
    detail = json.loads(page.text_content("#live-detail"))
    assert detail["event"] == "Signed Up" and detail["userId"] == "alice", detail
    shot(page, "3-live")

    # Suppress mallory; her next event shows as suppressed.
    page.click("text=Privacy")
    page.wait_for_selector("#suppress")
    page.fill("#suppress-users", "mallory")
    page.click("#suppress button[type=submit]")
    page.wait_for_selector("#status:has-text('suppressed')", timeout=5_000)
    shot(page, "4-privacy")
    page.click("text=Live events")
    wait_connected(page)
    # The key cache learns of the suppression within catalog.refresh_interval_ms.
    deadline = time.monotonic() + 10
    while True:
        curl_batch(key, [{"type": "track", "userId": "mallory", "event": "Tried", "messageId": f"mallory-{time.monotonic_ns()}"}])
        try:
            page.wait_for_selector("#live-rows tr[data-kind='suppressed']", timeout=1_000)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise

    # A deletion of alice, watched to `done`.
    page.click("text=Privacy")
    page.wait_for_selector("#delete")
    page.fill("#delete-users", "alice")
    page.click("#delete button[type=submit]")
    page.wait_for_selector("#deletions-table tr[data-status='done']", timeout=90_000)
    shot(page, "5-deletion-done")

    for tab, name in [("Keys", "6-keys"), ("Replays", "7-replays")]:
        page.click(f"text={tab}")
        page.wait_for_selector(f"#tab-{tab.lower()}")
        shot(page, name)
    page.click("nav#nav >> text=Migrations")
    page.wait_for_selector("#new-migration")
    shot(page, "8-migrations")
    page.click("nav#nav >> text=Audit log")
    page.wait_for_selector("#audit tbody tr")
    audit = page.text_content("#audit")
    assert "project.create" in audit and "suppression" in audit, audit
    shot(page, "9-audit")

    # A link carrying another org's token never silently replaces the session (login CSRF): the
    # console names both accounts and asks; staying keeps the org.
    assert "acme" in page.text_content("#account"), page.text_content("#account")
    page.goto(f"{BASE}/console/#token={OTHER_TOKEN}")
    page.wait_for_selector("#offered-account")
    assert "token=" not in page.url, page.url
    assert "intruder" in page.text_content("#offered-account")
    assert "acme" in page.text_content("#current-account")
    shot(page, "10-switch-account")
    page.click("#keep-account")
    page.wait_for_selector("#health table")
    assert "acme" in page.text_content("#account"), page.text_content("#account")


with sync_playwright() as playwright:
    # As root in a container: no sandbox, and /tmp instead of a possibly small /dev/shm.
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        run(page)
    except Exception:
        shot(page, "failure")
        print("page at the failure:", page.url, page.text_content("main"), file=sys.stderr)
        print("browser console errors:", problems, file=sys.stderr)
        raise
    finally:
        browser.close()

if problems:
    print("browser console errors:", problems, file=sys.stderr)
    sys.exit(1)
print(json.dumps(facts))
