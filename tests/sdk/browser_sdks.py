"""Drives a real browser SDK in headless Chromium against Meridian, from a page of another origin
(so every request passes the browser's CORS checks), as a site would use it. Run by
tests/sdk_e2e.rs:
    python3 browser_sdks.py segment|rudder|rudder-beacon <meridian url> <write key> <run id> <count>
with CHROMIUM (the browser binary) and SDK_DIR (tests/sdk, with node_modules installed) set.

Each page sends COUNT track events with properties {run, seq} and an identify, then waits until
the SDK says it is done (analytics-next: every track's promise; RudderStack: its queue drained, or
for beacons, the page's hide flushing them). Prints JSON: the events sent and what the browser
saw (requests, their statuses and headers, console errors). Exits non-zero on a request Meridian
refused (other than 429/503, which ask for a retry) or one the browser failed (CORS included).
"""

import functools
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading

from playwright.sync_api import sync_playwright

sdk, meridian, write_key, run, count = sys.argv[1:6]
count = int(count)
CHROMIUM = os.environ["CHROMIUM"]
SDK_DIR = os.environ["SDK_DIR"]

SEGMENT_PAGE = """<!doctype html><meta charset="utf-8"><title>segment</title>
<script src="analytics-next.js"></script>
<script>
window.sendAll = async (config) => {
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
    { writeKey: config.writeKey, cdnURL: config.meridian });
  const sent = [];
  for (let seq = 0; seq < config.count; seq++) {
    const context = await analytics.track("Browser Event", { run: config.run, seq });
    sent.push(context.event.messageId);
  }
  const identified = await analytics.identify("browser-user", { plan: "pro" });
  sent.push(identified.event.messageId);
  return sent;
};
</script>"""

RUDDER_PAGE = """<!doctype html><meta charset="utf-8"><title>rudder</title>
<script src="rsa.js"></script>
<script>
window.sendAll = (config) => new Promise((resolve, reject) => {
  const analytics = new rudderanalytics.RudderAnalytics();
  analytics.load(config.writeKey, config.meridian, {
    // No control plane: the source's configuration is given here.
    getSourceConfig: () => ({ source: { id: "meridian-test-source", name: "Meridian test",
      writeKey: config.writeKey, enabled: true, workspaceId: "meridian", config: {}, destinations: [] } }),
    useBeacon: config.beacon,
    beaconQueueOptions: { flushQueueInterval: 200 },
    queueOptions: { minRetryDelay: 200, maxRetryDelay: 1000 },
    logLevel: "ERROR",
  });
  analytics.ready(() => {
    for (let seq = 0; seq < config.count; seq++) {
      analytics.track("Browser Event", { run: config.run, seq });
    }
    analytics.identify("browser-user", { plan: "pro" });
    resolve([]);
  });
  setTimeout(() => reject(new Error("the SDK did not become ready in 20 s")), 20000);
});
</script>"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_page(directory):
    handler = functools.partial(QuietHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    page_dir = tempfile.mkdtemp(prefix="meridian-sdk-page-")
    modules = os.path.join(SDK_DIR, "node_modules")
    shutil.copy(os.path.join(modules, "@segment/analytics-next/dist/umd/index.js"),
                os.path.join(page_dir, "analytics-next.js"))
    shutil.copy(os.path.join(modules, "@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js"),
                os.path.join(page_dir, "rsa.js"))
    with open(os.path.join(page_dir, "segment.html"), "w") as page:
        page.write(SEGMENT_PAGE)
    with open(os.path.join(page_dir, "rudder.html"), "w") as page:
        page.write(RUDDER_PAGE)
    server = serve_page(page_dir)
    origin = f"http://127.0.0.1:{server.server_port}"
    seen = {"requests": [], "console_errors": [], "failed": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        page = browser.new_context().new_page()
        page.on("console", lambda message: seen["console_errors"].append(message.text)
                if message.type == "error" else None)
        page.on("pageerror", lambda error: seen["console_errors"].append(str(error)))
        page.on("requestfailed", lambda request: seen["failed"].append(
            f"{request.method} {request.url}: {request.failure}"))

        def on_response(response):
            if response.url.startswith(meridian):
                path = response.url[len(meridian):].split("?")[0]
                seen["requests"].append({"method": response.request.method, "path": path,
                                         "status": response.status,
                                         "headers": sorted(response.request.headers.keys())})
        page.on("response", on_response)
        page_name = "segment.html" if sdk == "segment" else "rudder.html"
        page.goto(f"{origin}/{page_name}")
        config = {"writeKey": write_key, "meridian": meridian, "run": run, "count": count,
                  "beacon": sdk == "rudder-beacon"}
        message_ids = page.evaluate("config => window.sendAll(config)", config)
        if sdk == "rudder":
            # The XHR queue sends every event (and retries what fails) on its own: wait until
            # Meridian has answered one 200 per event.
            expected = count + 1
            deadline_ms = 30_000
            waited = 0
            while sum(1 for r in seen["requests"] if r["method"] == "POST" and r["status"] == 200) < expected:
                page.wait_for_timeout(100)
                waited += 100
                if waited > deadline_ms:
                    break
        elif sdk == "rudder-beacon":
            # Beacons go when the queue flushes (every 200 ms here) or the page is hidden; leave
            # the page as a visitor would, and give the browser the moment it needs to send them.
            page.wait_for_timeout(1_000)
            page.goto("about:blank")
        browser.close()
    server.shutdown()
    print(json.dumps({"sdk": sdk, "origin": origin, "message_ids": message_ids, **seen}))
    # 429 and 503 ask the SDK to retry (the retry test provokes them); anything else is a refusal.
    refused = [request for request in seen["requests"]
               if request["status"] >= 400 and request["status"] not in (429, 503)]
    if refused or seen["failed"]:
        sys.exit(f"requests refused or failed: {refused} {seen['failed']}")


main()
