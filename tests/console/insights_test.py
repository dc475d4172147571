"""The console's Insights page in headless Chromium: the events per day of a project drawn as bars
(SVG drawn by the page), the top events with their users, and a range picked; then its Delivery
ledger page. EXPECTED (JSON) holds the counts the pages must show: {"days": {"YYYY-MM-DD": events},
"top": [[event, events, users]], "ledger": {"day": "YYYY-MM-DD", "acknowledged": n}}.
Writes screenshots; exits non-zero with the reason on any failure."""

import json
import os
import sys
import time

from playwright.sync_api import sync_playwright

BASE = os.environ["BASE_URL"]
TOKEN = os.environ["TOKEN"]
PROJECT = os.environ["PROJECT_ID"]
EXPECTED = json.loads(os.environ["EXPECTED"])
ARTIFACTS = os.environ["ARTIFACT_DIR"]
CHROMIUM = os.environ["CHROMIUM"]
os.makedirs(ARTIFACTS, exist_ok=True)


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"), full_page=True)


def bars(page):
    return {
        bar.get_attribute("data-start")[:10]: int(bar.get_attribute("data-events"))
        for bar in page.query_selector_all("#volume-chart rect.bar")
    }


def wait_for_bars(page, count):
    """Waits until the chart has `count` bars (polled: the CSP forbids evaluating a string)."""
    deadline = time.monotonic() + 10
    while len(page.query_selector_all("#volume-chart rect.bar")) != count:
        assert time.monotonic() < deadline, f"no chart of {count} bars"
        page.wait_for_timeout(50)


def run(page):
    page.goto(f"{BASE}/console/#token={TOKEN}")
    page.wait_for_selector("#health table", timeout=10_000)
    page.goto(f"{BASE}/console/#/project/{PROJECT}/insights")
    page.wait_for_selector("#volume-chart rect.bar", state="attached", timeout=15_000)
    drawn = bars(page)
    assert len(drawn) == 30, f"thirty days by default, got {len(drawn)}"
    shown = {day: events for day, events in drawn.items() if events}
    assert shown == EXPECTED["days"], f"bars {shown} != {EXPECTED['days']}"
    rows = [
        [cell.text_content() for cell in row.query_selector_all("td")]
        for row in page.query_selector_all("#top-events tbody tr")
    ]
    expected_rows = [[event, str(events), str(users)] for event, events, users in EXPECTED["top"]]
    assert rows == expected_rows, f"top events {rows} != {expected_rows}"
    shot(page, "insights-30-days")

    # A narrower range: only its days are drawn.
    days = sorted(EXPECTED["days"])
    page.fill("#insights-from", days[0])
    page.fill("#insights-to", days[0])
    page.click("#insights-range button[type=submit]")
    wait_for_bars(page, 1)
    assert bars(page) == {days[0]: EXPECTED["days"][days[0]]}, bars(page)
    page.select_option("#insights-interval", "hour")
    page.click("#insights-range button[type=submit]")
    wait_for_bars(page, 24)
    total = sum(int(bar.get_attribute("data-events")) for bar in page.query_selector_all("#volume-chart rect.bar"))
    assert total == EXPECTED["days"][days[0]], f"hours sum to {total}"
    shot(page, "insights-one-day-by-hour")

    # The delivery ledger of the same project: today's messages (received today, whatever their
    # event time) acknowledged, archived and in the warehouse, reconciled once the stores report.
    ledger = EXPECTED["ledger"]
    page.goto(f"{BASE}/console/#/project/{PROJECT}/ledger")
    deadline = time.monotonic() + 20
    while True:
        page.wait_for_selector("#ledger-table tbody tr", timeout=10_000)
        cells = [cell.text_content() for cell in page.query_selector_all("#ledger-table tbody tr")[0].query_selector_all("td")]
        if cells[-1] == "reconciled" or time.monotonic() > deadline:
            break
        page.click("#ledger-range button[type=submit]")
        page.wait_for_timeout(300)
    count = str(ledger["acknowledged"])
    assert cells == [ledger["day"], count, "0", count, count, "0", "0", "reconciled"], f"today's ledger row {cells}"
    assert len(page.query_selector_all("#ledger-table tbody tr")) == 7, "the last 7 days by default"
    assert "Every acknowledged message" in page.text_content("#ledger-summary")
    shot(page, "ledger-7-days")


with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    problems = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        run(page)
    except Exception:
        shot(page, "insights-failure")
        print("page at the failure:", page.url, page.text_content("main"), file=sys.stderr)
        print("browser console errors:", problems, file=sys.stderr)
        raise
    finally:
        browser.close()
if problems:
    print("browser console errors:", problems, file=sys.stderr)
    sys.exit(1)
print("insights page ok")
