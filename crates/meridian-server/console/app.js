// The Meridian admin console: a page over the admin API (no second source of truth). Plain
// DOM code: every value from the API is put in the page as text, never as HTML.
"use strict";

const TOKEN_KEY = "meridian.token";
const ORG_KEY = "meridian.org";
const main = () => document.getElementById("main");
let pageAbort = null; // aborts the current page's streams and timers when the page changes

// ---- small helpers ----------------------------------------------------------------------

function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function show(...nodes) {
  const target = main();
  target.replaceChildren(...nodes.flat(2).filter(Boolean));
  target.focus();
}

function say(text, isError) {
  const status = document.getElementById("status");
  status.replaceChildren(h("span", { class: isError ? "error" : "ok" }, text));
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function claimsOf(value) {
  if (!value) return null;
  try {
    const payload = value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload));
  } catch (_) {
    return null;
  }
}

function claims() { return claimsOf(token()); }

function describeAccount(accountClaims) {
  const who = accountClaims.sub || "someone";
  const where = accountClaims.role === "platform" ? "the platform" : "org " + (accountClaims.org_id || "?");
  return who + " (" + (accountClaims.role || "?") + ") of " + where;
}

function org() { return (claims() || {}).org_id || sessionStorage.getItem(ORG_KEY) || ""; }

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    signal: pageAbort ? pageAbort.signal : undefined,
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    if (response.status === 401) { signOut("The token was refused (expired?): sign in again."); }
    throw new ApiError(response.status, data && data.code, (data && data.message) || text || response.statusText);
  }
  return data;
}

function when(timestamp) { return timestamp ? timestamp.replace("T", " ").replace(/\.\d+Z$/, "Z") : ""; }

function table(headings, rows, attributes) {
  return h("table", attributes || {},
    h("thead", {}, h("tr", {}, headings.map((heading) => h("th", { scope: "col" }, heading)))),
    h("tbody", {}, rows));
}

function guarded(work) {
  return async (event) => {
    if (event) event.preventDefault();
    try { await work(event); } catch (error) {
      if (error.name === "AbortError") return;
      say(error.message, true);
    }
  };
}

function every(milliseconds, work) {
  const signal = pageAbort.signal;
  const run = async () => {
    if (signal.aborted) return;
    try { await work(); } catch (error) { if (error.name !== "AbortError") say(error.message, true); }
    if (!signal.aborted) setTimeout(run, milliseconds);
  };
  run();
}

// ---- sign-in ----------------------------------------------------------------------------

// A token offered by a link waits here until its account is accepted (see offeredAccountPage).
let offeredToken = null;

// A link's token signs a tab in only when nobody is signed in; otherwise the tab asks before it
// switches accounts (a link from someone else must not silently put you into their org).
function takeTokenFromLink() {
  const match = location.hash.match(/^#token=([^&]+)/);
  if (!match) return;
  // The token leaves the address bar (and the history) at once.
  history.replaceState(null, "", location.pathname + "#/");
  const offered = decodeURIComponent(match[1]);
  if (!claimsOf(offered)) { say("The link's token is not a token: ignored.", true); return; }
  if (!token()) { sessionStorage.setItem(TOKEN_KEY, offered); return; }
  if (offered !== token()) offeredToken = offered;
}

function offeredAccountPage() {
  const offered = offeredToken;
  const stay = () => { offeredToken = null; route(); };
  show(
    h("h1", {}, "Switch accounts?"),
    h("p", {}, "You are signed in as ", h("strong", { id: "current-account" }, describeAccount(claims())), "."),
    h("p", {}, "The link you opened signs in as ", h("strong", { id: "offered-account" }, describeAccount(claimsOf(offered))),
      ". Switch only if you meant to: whoever made the link chose that account."),
    h("button", { type: "button", id: "switch-account", onclick: () => {
      offeredToken = null;
      sessionStorage.setItem(TOKEN_KEY, offered);
      sessionStorage.removeItem(ORG_KEY);
      route();
    } }, "Switch to " + describeAccount(claimsOf(offered))),
    h("button", { type: "button", id: "keep-account", onclick: stay }, "Stay signed in as " + describeAccount(claims())),
  );
}

// The header says whose console this is.
function showAccount() {
  const account = document.getElementById("account");
  const current = claims();
  account.textContent = current ? describeAccount(current) + (org() && current.role === "platform" ? ", viewing org " + org() : "") : "";
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ORG_KEY);
  location.hash = "#/signin";
  if (message) say(message, true);
}

function signInPage() {
  document.getElementById("nav").hidden = true;
  const field = h("textarea", { id: "token", name: "token", required: true, autocomplete: "off", spellcheck: "false" });
  show(
    h("h1", {}, "Sign in"),
    h("p", {}, "Paste an admin token (", h("code", {}, "meridian token issue"), "), or open the link ",
      h("code", {}, "meridian console login"), " prints. The token stays in this tab only."),
    h("form", { id: "sign-in", onsubmit: guarded(() => {
      sessionStorage.setItem(TOKEN_KEY, field.value.trim());
      if (!claims()) { sessionStorage.removeItem(TOKEN_KEY); throw new Error("that is not a token"); }
      location.hash = "#/";
    }) }, h("label", { for: "token" }, "Admin token"), field, h("button", { type: "submit" }, "Sign in")),
  );
}

// ---- overview ---------------------------------------------------------------------------

async function overviewPage() {
  if (!org()) {
    const field = h("input", { id: "org-id", name: "org", required: true });
    show(h("h1", {}, "Which org?"), h("form", { onsubmit: guarded(() => {
      sessionStorage.setItem(ORG_KEY, field.value.trim()); route();
    }) }, h("label", { for: "org-id" }, "Org id"), field, h("button", { type: "submit" }, "Open")));
    return;
  }
  const [projects, regions, volume] = await Promise.all([
    api("GET", `/admin/orgs/${encodeURIComponent(org())}/projects?limit=1000`),
    api("GET", "/admin/regions"),
    api("GET", `/admin/orgs/${encodeURIComponent(org())}/volume`).catch(() => null),
  ]);
  let primary = "";
  try { primary = (await api("GET", `/admin/regions/orgs/${encodeURIComponent(org())}`)).primary_region; } catch (_) { primary = "(owners see it)"; }
  const counts = (volume && volume.projects) || {};
  const rows = projects.items.map((project) => h("tr", {},
    h("td", {}, h("a", { href: `#/project/${project.project_id}` }, project.name)),
    h("td", {}, h("code", {}, project.project_id)),
    h("td", {}, project.region),
    h("td", { "data-volume": project.project_id }, counts[project.project_id] === undefined ? "–" : String(counts[project.project_id]))));
  const health = h("div", { id: "health" }, h("p", { class: "note" }, "Loading health…"));
  show(
    h("h1", {}, `Org ${org()}`),
    h("p", {}, "Primary region: ", h("strong", {}, primary)),
    h("h2", {}, "Projects"),
    rows.length ? table(["Name", "Id", "Region", "Events, last hour"], rows, { id: "projects" })
      : h("p", {}, "No project yet. ", h("a", { href: "#/new" }, "Create one.")),
    h("h2", {}, "Regions"),
    table(["Region", "Name", "Status"], regions.map((region) => h("tr", {},
      h("td", {}, region.id), h("td", {}, region.display_name), h("td", {}, region.status)))),
    h("h2", {}, "This node's health"), health,
  );
  const ready = await fetch("/readyz", { signal: pageAbort.signal }).then((response) => response.json());
  const regionRows = Object.entries(ready.regions || {}).map(([id, region]) => {
    const problems = (region.sinks || []).map((sink) => sink.problem).filter(Boolean);
    return h("tr", {}, h("td", {}, id), h("td", {}, String(region.pending_records)),
      h("td", {}, region.queue_writable ? "yes" : "no"),
      h("td", { class: problems.length ? "error" : "ok" }, problems.length ? problems.join("; ") : "ok"));
  });
  health.replaceChildren(h("p", {}, ready.ready ? "Ready." : "Not ready."),
    table(["Region", "Queued messages", "Accepting", "Sinks and residency guard"], regionRows));
}

// ---- new project -----------------------------------------------------------------------

const snippets = (key) => {
  const host = location.origin;
  return [
    ["Python", `import segment.analytics as analytics\nanalytics.write_key = "${key}"\nanalytics.host = "${host}"\nanalytics.track("user-1", "Signed Up")`],
    ["Node", `const { Analytics } = require("@segment/analytics-node")\nconst analytics = new Analytics({ writeKey: "${key}", host: "${host}" })\nanalytics.track({ userId: "user-1", event: "Signed Up" })`],
    ["analytics.js", `analytics.load("${key}", { cdnURL: "${host}", integrations: { "Segment.io": { apiHost: "${location.host}/v1", protocol: "${location.protocol.replace(":", "")}" } } })`],
  ];
};

async function newProjectPage() {
  const regions = await api("GET", "/admin/regions");
  const name = h("input", { id: "project-name", name: "name", required: true, maxlength: 200 });
  const region = h("select", { id: "project-region", name: "region" },
    regions.filter((entry) => entry.status === "available").map((entry) =>
      h("option", { value: entry.id, selected: entry.default }, `${entry.id} — ${entry.display_name}`)));
  const result = h("div", { id: "created" });
  show(
    h("h1", {}, "New project"),
    h("form", { id: "new-project", onsubmit: guarded(async () => {
      const created = await api("POST", `/admin/orgs/${encodeURIComponent(org())}/projects`, { name: name.value, region: region.value });
      const key = h("span", { class: "key", id: "write-key" }, created.write_key);
      result.replaceChildren(
        h("h2", {}, `Project ${created.name} in ${created.region}`),
        h("p", { class: "warning" }, "This write key is shown once. Keep it now."),
        h("div", { class: "row" }, key, h("button", { type: "button", class: "secondary", id: "copy-key", onclick: guarded(async () => {
          await navigator.clipboard.writeText(created.write_key); say("Copied.");
        }) }, "Copy")),
        h("p", {}, h("a", { href: `#/project/${created.project_id}`, id: "open-project" }, "Open the project")),
        ...snippets(created.write_key).flatMap(([language, code]) => [h("h2", {}, language), h("pre", {}, h("code", {}, code))]));
      say(`Project ${created.project_id} created in ${created.region}.`);
    }) },
      h("label", { for: "project-name" }, "Name"), name,
      h("label", { for: "project-region" }, "Region"), region,
      h("p", { class: "warning" }, "A project's region cannot be changed later: its events and everything about its users stay there for good."),
      h("button", { type: "submit" }, "Create project")),
    result);
}

// ---- a project --------------------------------------------------------------------------

const TABS = [["live", "Live events"], ["insights", "Insights"], ["ledger", "Delivery ledger"], ["privacy", "Privacy"], ["keys", "Keys"], ["replays", "Replays"]];

async function projectPage(projectId, tab) {
  const project = await api("GET", `/admin/projects/${encodeURIComponent(projectId)}`);
  const body = h("section", { id: `tab-${tab}` });
  show(
    h("h1", {}, `${project.name} `, h("span", { class: "note" }, `${project.project_id} · ${project.region}`)),
    h("nav", { class: "tabs", "aria-label": "Project" }, TABS.map(([id, label]) =>
      h("a", { href: `#/project/${projectId}/${id}`, "aria-current": id === tab ? "page" : false }, label))),
    body);
  const pages = { live: livePanel, insights: insightsPanel, ledger: ledgerPanel, privacy: privacyPanel, keys: keysPanel, replays: replaysPanel };
  await (pages[tab] || livePanel)(project, body);
}

function summary(message) {
  return {
    type: message.type || "", event: message.event || message.name || "",
    user: message.userId === undefined || message.userId === null ? (message.anonymousId ? `anon ${message.anonymousId}` : "") : String(message.userId),
    received: message.receivedAt || "",
  };
}

async function livePanel(project, body) {
  const rows = h("tbody", { id: "live-rows" });
  const detail = h("pre", { id: "live-detail", hidden: true });
  const state = h("p", { class: "note", id: "live-state" }, "Connecting…");
  body.replaceChildren(
    h("p", {}, "Messages of this project as they are accepted (newest first; sampled under heavy load). Suppressed and rejected ones are marked, with the reason."),
    state,
    h("table", { id: "live" }, h("thead", {}, h("tr", {}, ["Kind", "Type", "Event", "User", "Received"].map((label) => h("th", { scope: "col" }, label)))), rows),
    detail);
  const add = (kind, message, extra) => {
    const facts = summary(message || {});
    const row = h("tr", { class: `clickable ${kind}`, tabindex: 0, "data-kind": kind, "data-message-id": (message && message.messageId) || "" },
      h("td", {}, kind), h("td", {}, facts.type), h("td", {}, facts.event || extra || ""), h("td", {}, facts.user), h("td", {}, when(facts.received)));
    const open = () => { detail.hidden = false; detail.textContent = JSON.stringify(message || extra, null, 2); };
    row.addEventListener("click", open);
    row.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
    rows.prepend(row);
    while (rows.children.length > 200) rows.lastChild.remove();
  };
  const response = await fetch(`/admin/projects/${encodeURIComponent(project.project_id)}/events/live`, {
    headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" }, signal: pageAbort.signal,
  });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    state.textContent = `The live feed is not available: ${problem.message || response.status}`;
    state.className = "error";
    return;
  }
  state.textContent = "Connected: waiting for events.";
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) { state.textContent = "The feed ended; reload the page to reconnect."; return; }
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      const event = JSON.parse(data);
      if (name === "accepted") add("accepted", event.message);
      else if (name === "suppressed") add("suppressed", event.message);
      else if (name === "rejected") add("rejected", event.message, `${event.code}: ${event.reason}`);
      else if (name === "skipped") state.textContent = `Connected (${event.count} messages not shown: sampled or too fast for this page).`;
    }
  }
}

const SVG_NS = "http://www.w3.org/2000/svg";

// An SVG element with attributes (numbers and text only: nothing is parsed as markup).
function svg(tag, attributes, ...children) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) element.setAttribute(name, String(value));
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// Events per bucket as bars, drawn here (no chart library): the tallest bar sets the scale.
function volumeChart(series, interval) {
  const width = 760, height = 240, left = 48, bottom = 28, top = 12;
  const plotWidth = width - left - 8, plotHeight = height - top - bottom;
  const most = Math.max(1, ...series.map((point) => point.events));
  const slot = plotWidth / Math.max(1, series.length);
  const bars = series.map((point, index) => {
    const barHeight = Math.round((point.events / most) * plotHeight);
    const label = `${point.start.slice(0, interval === "hour" ? 13 : 10).replace("T", " ")}${interval === "hour" ? ":00" : ""}: ${point.events} events, ${point.users} users`;
    return svg("rect", { x: (left + index * slot + slot * 0.1).toFixed(1), y: top + plotHeight - barHeight,
      width: Math.max(1, slot * 0.8).toFixed(1), height: barHeight, class: "bar", "data-start": point.start, "data-events": point.events },
      svg("title", {}, label));
  });
  const every = Math.max(1, Math.ceil(series.length / 8));
  const ticks = series.map((point, index) => index % every === 0
    ? svg("text", { x: (left + index * slot + slot / 2).toFixed(1), y: height - 8, "text-anchor": "middle", class: "tick" },
      interval === "hour" ? point.start.slice(11, 13) + "h" : point.start.slice(5, 10))
    : null);
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", id: "volume-chart", "aria-label": `Events per ${interval}` },
    svg("line", { x1: left, y1: top + plotHeight, x2: width - 8, y2: top + plotHeight, class: "axis" }),
    svg("text", { x: left - 6, y: top + 10, "text-anchor": "end", class: "tick" }, String(most)),
    svg("text", { x: left - 6, y: top + plotHeight, "text-anchor": "end", class: "tick" }, "0"),
    bars, ticks);
}

async function insightsPanel(project, body) {
  const id = encodeURIComponent(project.project_id);
  const today = new Date();
  const day = (date) => date.toISOString().slice(0, 10);
  const from = h("input", { id: "insights-from", type: "date", value: day(new Date(today.getTime() - 29 * 86400000)), required: true });
  const to = h("input", { id: "insights-to", type: "date", value: day(today), required: true });
  const interval = h("select", { id: "insights-interval" }, h("option", { value: "day" }, "Per day"), h("option", { value: "hour" }, "Per hour"));
  const chart = h("div", { id: "insights-chart" });
  const top = h("div", { id: "insights-events" });
  const load = guarded(async () => {
    // `to` is inclusive in the picker: the question runs to the next midnight.
    const end = day(new Date(Date.parse(to.value) + 86400000));
    const range = `from=${from.value}&to=${end}`;
    const volume = await api("GET", `/admin/projects/${id}/insights/volume?${range}&interval=${interval.value}`);
    const events = await api("GET", `/admin/projects/${id}/insights/events?${range}&limit=20`);
    const total = volume.series.reduce((sum, point) => sum + point.events, 0);
    chart.replaceChildren(h("p", { class: "note", id: "insights-total" }, `${total} events from ${from.value} to ${to.value} (event time, UTC).`),
      volumeChart(volume.series, volume.interval));
    top.replaceChildren(h("h2", {}, "Top events"), events.events.length === 0 ? h("p", { class: "note" }, "No track events in this range.") :
      table(["Event", "Events", "Users"], events.events.map((total) => h("tr", {}, h("td", {}, total.event), h("td", {}, String(total.events)), h("td", {}, String(total.users)))), { id: "top-events" }));
  });
  body.replaceChildren(
    h("p", {}, `What this project's events look like, from its region's warehouse (${project.region}).`),
    h("form", { id: "insights-range", class: "row", onsubmit: load },
      h("label", { for: "insights-from" }, "From"), from, h("label", { for: "insights-to" }, "To"), to,
      h("label", { for: "insights-interval" }, "Buckets"), interval, h("button", { type: "submit" }, "Show")),
    chart, top);
  await load();
}

async function ledgerPanel(project, body) {
  const id = encodeURIComponent(project.project_id);
  const today = new Date();
  const day = (date) => date.toISOString().slice(0, 10);
  const from = h("input", { id: "ledger-from", type: "date", value: day(new Date(today.getTime() - 6 * 86400000)), required: true });
  const to = h("input", { id: "ledger-to", type: "date", value: day(today), required: true });
  const days = h("div", { id: "ledger-days" });
  const count = (value) => value === null ? "—" : String(value);
  const load = guarded(async () => {
    const ledger = await api("GET", `/admin/projects/${id}/ledger?from=${from.value}&to=${to.value}`);
    const open = ledger.days.filter((row) => !row.reconciled).length;
    days.replaceChildren(
      h("p", { class: "note", id: "ledger-summary" }, open === 0
        ? `Every acknowledged message of these ${ledger.days.length} days is in every store of ${ledger.region}.`
        : `${open} of ${ledger.days.length} days still have messages on their way to a store.`),
      table(["Day (UTC)", "Acknowledged", "Suppressed", "Archived", "Warehouse", "Erased", "Queued", ""],
        ledger.days.slice().reverse().map((row) => h("tr", { class: row.reconciled ? "" : "pending" },
          h("td", {}, row.day), h("td", {}, String(row.acknowledged)), h("td", {}, String(row.suppressed)),
          h("td", {}, String(row.archived)), h("td", {}, count(row.warehouse)), h("td", {}, String(row.erased)),
          h("td", {}, String(row.queued)), h("td", {}, row.reconciled ? "reconciled" : "on its way"))),
        { id: "ledger-table" }));
  });
  body.replaceChildren(
    h("p", {}, `Every message answered 200, per day received, and where it is now (${project.region}). Erased counts what GDPR deletions removed since.`),
    h("form", { id: "ledger-range", class: "row", onsubmit: load },
      h("label", { for: "ledger-from" }, "From"), from, h("label", { for: "ledger-to" }, "To"), to,
      h("button", { type: "submit" }, "Show")),
    days);
  await load();
}

async function privacyPanel(project, body) {
  const id = encodeURIComponent(project.project_id);
  const suppressField = h("textarea", { id: "suppress-users", name: "users" });
  const liftField = h("input", { id: "lift-user", name: "user" });
  const deleteField = h("textarea", { id: "delete-users", name: "users" });
  const suppressions = h("div", { id: "suppressions" });
  const deletions = h("div", { id: "deletions" });
  const users = (field) => field.value.split(/[\n,]/).map((user) => user.trim()).filter(Boolean);
  body.replaceChildren(
    h("h2", {}, "Suppress users"),
    h("p", { class: "note" }, "Their new events are dropped at the door (answered 200, counted as suppressed)."),
    h("form", { id: "suppress", onsubmit: guarded(async () => {
      const result = await api("POST", `/admin/projects/${id}/suppressions`, { user_ids: users(suppressField) });
      say(`${result.suppressed} users suppressed (${result.newly_suppressed} new).`);
      suppressField.value = "";
      await loadSuppressions();
    }) }, h("label", { for: "suppress-users" }, "User ids, one per line"), suppressField, h("button", { type: "submit" }, "Suppress")),
    h("form", { id: "lift", onsubmit: guarded(async () => {
      await api("DELETE", `/admin/projects/${id}/suppressions/${encodeURIComponent(liftField.value.trim())}`);
      say("Suppression lifted."); liftField.value = ""; await loadSuppressions();
    }) }, h("label", { for: "lift-user" }, "Lift the suppression of"), liftField, h("button", { type: "submit", class: "secondary" }, "Lift")),
    suppressions,
    h("h2", {}, "Delete users' data"),
    h("p", { class: "note" }, "Deletes everything stored about them in the project's region (warehouse and archive), and suppresses them."),
    h("form", { id: "delete", onsubmit: guarded(async () => {
      const created = await api("POST", `/admin/projects/${id}/deletions`, { user_ids: users(deleteField) });
      say(`Deletion ${created.deletion_id} requested.`); deleteField.value = "";
    }) }, h("label", { for: "delete-users" }, "User ids, one per line"), deleteField, h("button", { type: "submit" }, "Request deletion")),
    deletions);
  async function loadSuppressions() {
    const page = await api("GET", `/admin/projects/${id}/suppressions?limit=100`);
    suppressions.replaceChildren(h("p", { class: "note" }, `${page.items.length} suppressed (shown as keyed hashes: user ids are not kept).`));
  }
  await loadSuppressions();
  every(1000, async () => {
    const listed = await api("GET", `/admin/projects/${id}/deletions`);
    deletions.replaceChildren(listed.items.length === 0 ? h("p", { class: "note" }, "No deletion requested.") :
      table(["Deletion", "Users", "Status", "Stage", "Warehouse rows", "Archive objects rewritten", "Requested", "Deadline"],
        listed.items.map((deletion) => h("tr", { "data-deletion": deletion.deletion_id, "data-status": deletion.status },
          h("td", {}, h("code", {}, deletion.deletion_id)), h("td", {}, String(deletion.user_count)),
          h("td", { class: deletion.status === "failed" ? "error" : "" }, deletion.status), h("td", {}, deletion.stage),
          h("td", {}, String(deletion.stores && deletion.stores.clickhouse ? deletion.stores.clickhouse.rows_deleted ?? "" : "")),
          h("td", {}, String(deletion.stores && deletion.stores.archive ? deletion.stores.archive.objects_rewritten ?? "" : "")),
          h("td", {}, when(deletion.created_at)), h("td", {}, when(deletion.deadline)))), { id: "deletions-table" }));
  });
}

async function keysPanel(project, body) {
  const grace = h("input", { id: "grace", name: "grace", type: "number", min: 0, max: 2592000, value: 86400 });
  const created = h("div", { id: "rotated" });
  body.replaceChildren(
    table(["Key prefix", "Created", "Expires"], project.keys.map((key) => h("tr", {},
      h("td", {}, h("code", {}, key.prefix)), h("td", {}, when(key.created_at)), h("td", {}, key.expires_at ? when(key.expires_at) : "never")))),
    h("form", { id: "rotate", onsubmit: guarded(async () => {
      const rotated = await api("POST", `/admin/projects/${encodeURIComponent(project.project_id)}/keys/rotate`, { grace_seconds: Number(grace.value) });
      created.replaceChildren(h("p", { class: "warning" }, "The new key is shown once:"), h("span", { class: "key" }, rotated.write_key),
        h("p", {}, `The previous keys stop at ${when(rotated.previous_key_expires_at)}.`));
    }) }, h("label", { for: "grace" }, "Grace period for the old keys (seconds)"), grace, h("button", { type: "submit" }, "Rotate the key")),
    created);
}

async function replaysPanel(project, body) {
  const id = encodeURIComponent(project.project_id);
  const from = h("input", { id: "replay-from", type: "date", required: true });
  const to = h("input", { id: "replay-to", type: "date", required: true });
  const listed = h("div", { id: "replays" });
  body.replaceChildren(
    h("p", {}, "Re-insert the archive of received days into the region's warehouse (only what it lacks)."),
    h("form", { id: "replay", onsubmit: guarded(async () => {
      const replay = await api("POST", `/admin/projects/${id}/replays`, { from: from.value, to: to.value });
      say(`Replay ${replay.replay_id} started.`);
    }) }, h("label", { for: "replay-from" }, "From"), from, h("label", { for: "replay-to" }, "To"), to, h("button", { type: "submit" }, "Replay")),
    listed);
  every(1000, async () => {
    const replays = await api("GET", `/admin/projects/${id}/replays`);
    listed.replaceChildren(table(["Replay", "Days", "Status", "Objects", "Inserted", "Already there", ""],
      replays.items.map((replay) => h("tr", {}, h("td", {}, h("code", {}, replay.replay_id)),
        h("td", {}, `${replay.from.slice(0, 10)} – ${replay.to.slice(0, 10)}`), h("td", {}, replay.status),
        h("td", {}, `${replay.objects_done}/${replay.objects_total}`), h("td", {}, String(replay.messages_inserted)),
        h("td", {}, String(replay.messages_present)),
        h("td", {}, ["pending", "running"].includes(replay.status) ? h("button", { type: "button", class: "secondary", onclick: guarded(async () => {
          await api("POST", `/admin/replays/${replay.replay_id}/cancel`); say("Cancel requested.");
        }) }, "Cancel") : "")))));
  });
}

// ---- migrations and audit ---------------------------------------------------------------

async function migrationsPage() {
  const projects = (await api("GET", `/admin/orgs/${encodeURIComponent(org())}/projects?limit=1000`)).items;
  const choice = (fieldId) => h("select", { id: fieldId }, projects.map((project) => h("option", { value: project.project_id }, `${project.name} (${project.region})`)));
  const source = choice("migration-source");
  const target = choice("migration-target");
  const listed = h("div", { id: "migrations" });
  show(h("h1", {}, "Region migrations"),
    h("p", {}, "Move a project's data to a project of this org in another region: copy, follow the source while the apps move, then cut over."),
    h("form", { id: "new-migration", onsubmit: guarded(async () => {
      const created = await api("POST", `/admin/orgs/${encodeURIComponent(org())}/migrations`, { source_project: source.value, target_project: target.value });
      say(`Migration ${created.migration_id} created; start it below.`);
    }) }, h("label", { for: "migration-source" }, "From"), source, h("label", { for: "migration-target" }, "To"), target, h("button", { type: "submit" }, "Create migration")),
    listed);
  const act = (migration, action, label) => h("button", { type: "button", class: "secondary", onclick: guarded(async () => {
    await api("POST", `/admin/migrations/${migration.migration_id}/${action}`); say(`${label}: done.`);
  }) }, label);
  every(2000, async () => {
    const migrations = await api("GET", `/admin/orgs/${encodeURIComponent(org())}/migrations`);
    listed.replaceChildren(table(["Migration", "From", "To", "Status", "Copied", "Lag", ""],
      migrations.items.map((migration) => h("tr", {}, h("td", {}, h("code", {}, migration.migration_id)),
        h("td", {}, `${migration.source_project} (${migration.source_region})`), h("td", {}, `${migration.target_project} (${migration.target_region})`),
        h("td", {}, migration.status), h("td", {}, `${migration.objects_copied} objects, ${migration.messages_copied} messages`),
        h("td", {}, String(migration.lag_objects)),
        h("td", { class: "row" }, migration.status === "pending" ? act(migration, "start", "Start") : "",
          migration.status === "dual_write" ? act(migration, "complete", "Cut over") : "",
          ["pending", "copying", "dual_write"].includes(migration.status) ? act(migration, "cancel", "Cancel") : "")))));
  });
}

async function auditPage(cursor) {
  const path = `/admin/orgs/${encodeURIComponent(org())}/audit?limit=50${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
  const page = await api("GET", path);
  show(h("h1", {}, "Audit log"),
    table(["#", "At", "Who", "Action", "Target", "Change"], page.items.map((entry) => h("tr", {},
      h("td", {}, String(entry.seq)), h("td", {}, when(entry.at)), h("td", {}, entry.actor), h("td", {}, entry.action),
      h("td", {}, h("code", {}, entry.target)), h("td", {}, h("code", {}, JSON.stringify(entry.after))))), { id: "audit" }),
    page.next_cursor ? h("button", { type: "button", id: "audit-next", onclick: guarded(() => auditPage(page.next_cursor)) }, "Next page") : h("p", { class: "note" }, "End of the log."));
}

// ---- routing ----------------------------------------------------------------------------

async function route() {
  if (pageAbort) pageAbort.abort();
  pageAbort = new AbortController();
  takeTokenFromLink();
  if (!token()) { signInPage(); showAccount(); return; }
  document.getElementById("nav").hidden = false;
  showAccount();
  if (offeredToken) { offeredAccountPage(); return; }
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  try {
    if (parts[0] === "signin") signInPage();
    else if (parts[0] === "new") await newProjectPage();
    else if (parts[0] === "project" && parts[1]) await projectPage(decodeURIComponent(parts[1]), parts[2] || "live");
    else if (parts[0] === "migrations") await migrationsPage();
    else if (parts[0] === "audit") await auditPage(null);
    else await overviewPage();
  } catch (error) {
    if (error.name === "AbortError") return;
    show(h("h1", {}, "Something went wrong"), h("p", { class: "error" }, error.message));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
});
