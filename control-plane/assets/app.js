// Switchyard ops dashboard: polls the control plane's JSON API and renders it. No framework
// and no build step; rows are updated in place so buttons stay put while the page refreshes.
"use strict";

const POLL_MS = 1000;
const POLICY_POLL_MS = 5000;
// A request unanswered this long is given up: a replica that hangs (frozen, stalled) keeps
// its connections open and never answers, and the page must not wait on it for ever.
const REQUEST_TIMEOUT_MS = 4000;
// Past this without a successful poll, the page says its data is stale: checked on a timer,
// not only when a poll ends (a hung replica's polls end only by the timeout).
const STALE_MS = 5000;
const FRESHNESS_TICK_MS = 500;

const $ = (id) => document.getElementById(id);
const pageStarted = Date.now();
let lastOk = 0;
let lastPolicy = 0; // when the policy was last asked for
let policyRead = 0; // when it was last read
let policyReading = false;
let lastStats = null; // the last /api/stats answer: whom the page was talking to
// The last answers' `registry`: whether etcd answered the reads behind them (when it does not,
// the control plane answers from the membership as last seen).
let lastRegistry = null;
let lastError = ""; // why the last poll failed ("" when it did not)
let polling = false;
const pending = new Set(); // worker ids with a drain/undrain request in flight
// A drain takes a second click within CONFIRM_MS: a stray click must not take a worker out of
// service. Worker id -> when the armed button disarms.
const CONFIRM_MS = 5000;
const armed = new Map();

// When something happened, as the page writes it: the time of day for today (the viewer's
// local day), the date before it otherwise ("Dec 5 14:03:07", with the year when not this
// one): the event lists keep hours to days, and an on-call engineer must tell last night's
// event from this morning's. `stampTitle` is the whole instant, for a tooltip.
function stamp(ms) {
  const at = new Date(ms);
  const now = new Date();
  const time = at.toLocaleTimeString();
  if (at.toDateString() === now.toDateString()) return time;
  const date = at.toLocaleDateString(undefined, at.getFullYear() === now.getFullYear()
    ? { month: "short", day: "numeric" }
    : { year: "numeric", month: "short", day: "numeric" });
  return `${date} ${time}`;
}
const stampTitle = (ms) => new Date(ms).toISOString();

// A `<time>` for `ms`: written as `stamp` writes it, the ISO instant in `datetime` and the
// tooltip.
function timeElement(ms) {
  const time = document.createElement("time");
  time.dateTime = stampTitle(ms);
  time.title = time.dateTime;
  time.textContent = stamp(ms);
  return time;
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function num(value, digits = 0) {
  return Number(value).toLocaleString(undefined, {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

// GETs `path` as JSON (insights.js uses it too), given up after REQUEST_TIMEOUT_MS.
async function getJson(path) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  try {
    const response = await fetch(path, { cache: "no-store", signal: controller.signal });
    const body = await response.json().catch((error) => {
      if (controller.signal.aborted) throw error;
      return {};
    });
    if (!response.ok) {
      throw new Error(body.error || `${path}: HTTP ${response.status}`);
    }
    return body;
  } catch (error) {
    if (controller.signal.aborted) {
      throw new Error(`no answer within ${REQUEST_TIMEOUT_MS / 1000} s (${path})`);
    }
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

function showError(message) {
  const banner = $("error");
  banner.textContent = message;
  banner.hidden = false;
}

function showNotice(message) {
  $("error").hidden = true;
  const banner = $("notice");
  banner.textContent = message;
  banner.hidden = false;
}

function renderReplica(stats) {
  const el = $("replica");
  const me = stats.replica;
  el.className = `replica ${stats.role}`;
  if (stats.role === "leader") {
    el.textContent = `${me.id}: leader (drains and policy changes are made here)`;
    return;
  }
  el.textContent = `${me.id}: follower (read-only) — leader: `;
  if (stats.leader) {
    const link = document.createElement("a");
    link.textContent = `${stats.leader.id}`;
    // The server names it with its scheme (https when dashboards serve TLS) and a host that
    // can be dialled (not 0.0.0.0 or the leader's own loopback).
    if (stats.leader_dashboard) link.href = stats.leader_dashboard;
    el.appendChild(link);
  } else {
    el.appendChild(document.createTextNode("none elected yet"));
  }
}

function renderTotals(stats) {
  const body = $("totals").querySelector("tbody");
  body.replaceChildren();
  const row = (name, p, total) => {
    const tr = document.createElement("tr");
    if (total) tr.className = "total";
    tr.append(
      cell(name),
      cell(num(p.workers), "num"),
      cell(num(p.ready), "num"),
      cell(num(p.draining), "num"),
      cell(num(p.unreachable), p.unreachable ? "num bad" : "num"),
      cell(`${num(p.ready_slots)} / ${num(p.total_slots)}`, "num"),
      cell(num(p.active), "num"),
      cell(num(p.queued), "num"),
      cell(num(p.tokens_per_s, 1), "num"),
    );
    body.appendChild(tr);
  };
  for (const p of stats.pools) row(p.pool, p, false);
  const sum = (key) => stats.pools.reduce((total, p) => total + p[key], 0);
  row("all", {
    workers: stats.workers,
    ready: sum("ready"),
    draining: sum("draining"),
    unreachable: sum("unreachable"),
    ready_slots: sum("ready_slots"),
    total_slots: sum("total_slots"),
    active: stats.active,
    queued: stats.queued,
    tokens_per_s: stats.tokens_per_s,
  }, true);
}

function workerRow(id) {
  const tr = document.createElement("tr");
  tr.dataset.workerId = id;
  for (let i = 0; i < 12; i++) tr.appendChild(document.createElement("td"));
  const action = document.createElement("td");
  const button = document.createElement("button");
  button.type = "button";
  button.addEventListener("click", () => onDrainButton(id, button));
  action.appendChild(button);
  tr.appendChild(action);
  return tr;
}

function renderWorkers(workers) {
  const body = $("workers").querySelector("tbody");
  const rows = new Map([...body.children].map((tr) => [tr.dataset.workerId, tr]));
  const seen = new Set();
  for (const w of workers) {
    seen.add(w.id);
    let tr = rows.get(w.id);
    if (!tr) {
      tr = workerRow(w.id);
    }
    body.appendChild(tr); // keeps the API's order (pool, id)
    const c = tr.children;
    const set = (i, text, className = "") => {
      if (c[i].textContent !== text) c[i].textContent = text;
      c[i].className = className;
    };
    set(0, w.pool);
    set(1, w.id, "mono long");
    set(2, w.address, "mono long");
    set(3, w.models.join(", "));
    c[4].className = `state state-${w.state}`;
    c[4].textContent = w.state;
    if (w.drain_requested && w.state !== "draining") {
      const note = document.createElement("span");
      note.className = "pending";
      note.textContent = "drain requested";
      c[4].appendChild(note);
    } else if (!w.drain_requested && w.state === "draining") {
      const note = document.createElement("span");
      note.className = "pending";
      note.textContent = "shutting down or resuming";
      c[4].appendChild(note);
    }
    set(5, num(w.capacity.max_concurrent), "num");
    set(6, num(w.capacity.tokens_per_s, 1), "num");
    set(7, num(w.capacity.cost_per_mtok, 2), "num");
    set(8, `${w.engine} ${w.version}`);
    set(9, w.hardware);
    set(10, w.load ? `${num(w.load.active)} / ${num(w.load.queued)}` : "no stream", "num");
    if (w.unreachable) {
      // Why the control plane cannot reach it (a refused cluster token, a TLS failure): the
      // worker is left out of the ready totals.
      const why = document.createElement("span");
      why.className = "why";
      why.textContent = w.unreachable.reason;
      why.title = `failing since ${stamp(w.unreachable.since_unix_ms)} ` +
        `(${stampTitle(w.unreachable.since_unix_ms)}), ${w.unreachable.attempts} attempts`;
      c[10].appendChild(why);
      c[10].className = "no-stream";
    }
    set(11, w.load ? num(w.load.tokens_per_s, 1) : "–", "num");
    const button = c[12].firstChild;
    const action = w.drain_requested ? "undrain" : "drain";
    button.dataset.action = action;
    renderDrainButton(button, w.id, action);
    button.disabled = pending.has(w.id);
  }
  for (const [id, tr] of rows) {
    if (!seen.has(id)) tr.remove();
  }
  $("worker-count").textContent = `(${workers.length})`;
  $("no-workers").hidden = workers.length > 0;
}

// Bytes as on-call reads them: KiB, MiB, GiB.
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i && !Number.isInteger(n) ? n.toFixed(1) : n} ${units[i]}`;
}

// A journaling router's state says how large its journal is (its verdict, what is unsynced).
function mirrorState(r) {
  return r.response_mirror === "journaled" && r.journal_bytes
    ? `journaled, ${bytes(r.journal_bytes)}`
    : r.response_mirror;
}

function renderRouters(routers) {
  const rows = routers.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.routerId = r.router;
    tr.dataset.mirror = r.response_mirror;
    tr.dataset.trouble = String(r.trouble);
    if (r.trouble) tr.className = "trouble";
    const store = r.store_limit_bytes
      ? `${bytes(r.store_bytes)} of ${bytes(r.store_limit_bytes)}`
      : "none kept";
    tr.append(
      cell(r.router, "mono long"),
      cell(num(r.stored_responses), "num"),
      cell(num(r.stored_conversations), "num"),
      cell(store, "num nowrap"),
      cell(num(r.standby_responses), "num"),
      cell(mirrorState(r), `state state-mirror-${r.response_mirror}`),
      cell(num(r.sessions), "num"),
      cell(num(r.background_responses), "num"),
      cell(num(r.batches_running), "num"),
      cell(r.verdict, r.trouble ? "why bad" : "why"),
    );
    return tr;
  });
  $("routers").querySelector("tbody").replaceChildren(...rows);
  $("router-count").textContent = `(${routers.length})`;
  $("no-routers").hidden = routers.length > 0;
}

function renderEvents(events) {
  const list = $("events");
  list.replaceChildren();
  for (const e of events.slice().reverse()) {
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    li.append(timeElement(e.at_unix_ms));
    if (e.kind === "admin_write") {
      // The audit trail: who changed the cluster, set apart from what the cluster did.
      const tag = document.createElement("strong");
      tag.textContent = "audit ";
      li.append(tag);
    }
    li.append(document.createTextNode(e.message));
    list.appendChild(li);
  }
  $("no-events").hidden = events.length > 0;
}

// The policy is read from etcd, with no last-seen fallback: while etcd is away its read fails
// (or hangs until the request timeout). That is said in the policy section alone and the
// document last read stays: it must not fail the poll, which would turn the page into "no
// answer from this control plane" while the control plane answers and only etcd is away.
async function refreshPolicy() {
  if (policyReading) return;
  policyReading = true;
  lastPolicy = Date.now();
  const unread = $("policy-unread");
  try {
    showPolicy(await getJson("/api/policy"));
    policyRead = Date.now();
    unread.hidden = true;
  } catch (error) {
    unread.textContent = `The policy could not be read now: ${error.message}. ` +
      (policyRead ? `Shown as read at ${stamp(policyRead)}.` : "");
    unread.hidden = false;
  } finally {
    policyReading = false;
  }
}

function showPolicy(policy) {
  $("policy").textContent = typeof policy.document === "string"
    ? policy.document
    : JSON.stringify(policy.document, null, 2);
  $("policy-source").textContent = policy.is_default
    ? "(built-in default: none stored in etcd)"
    : policy.invalid
      ? "(stored in etcd: INVALID, not applied)"
      : "(stored in etcd)";
  // A document written into etcd past the admin API's validation: routers do not apply it.
  const invalid = $("policy-invalid");
  invalid.textContent = policy.invalid
    ? `The stored document is invalid and routers do not apply it: ${policy.invalid}. ` +
      "Running routers keep their last valid policy; a router that starts now has none and " +
      "is not ready until a valid document is stored (switchyard admin policy set)."
    : "";
  invalid.hidden = !policy.invalid;
}

async function refresh() {
  // One poll at a time: a hung replica's polls would otherwise pile up (until the timeout).
  if (polling) return;
  polling = true;
  try {
    const [workers, stats, events, routers] = await Promise.all([
      getJson("/api/workers"),
      getJson("/api/stats"),
      getJson("/api/events"),
      getJson("/api/routers"),
    ]);
    renderWorkers(workers.workers);
    renderRouters(routers.routers);
    renderTotals(stats);
    lastStats = stats;
    // Either answer's read may be the one etcd did not answer: the page says so if one did not.
    lastRegistry = [workers.registry, stats.registry].find((r) => r && !r.reachable) ||
      stats.registry || null;
    renderReplica(stats);
    renderEvents(events.events);
    if (Date.now() - lastPolicy > POLICY_POLL_MS) refreshPolicy();
    lastOk = Date.now();
    lastError = "";
    if ($("error").dataset.source === "poll") $("error").hidden = true;
  } catch (error) {
    lastError = error.message;
    // Once stale, the staleness banner says it (with this reason).
    if (!isStale()) {
      showError(`Cannot read the cluster state: ${error.message}`);
      $("error").dataset.source = "poll";
    }
  } finally {
    polling = false;
  }
  renderFreshness();
}

// Milliseconds since the page last heard from its control plane (since it opened, before).
const silence = () => Date.now() - (lastOk || pageStarted);
const isStale = () => silence() > STALE_MS;
// A page left open overnight says from which day its last answer is.
const clock = stamp;

// How fresh the data is, redrawn on a timer: a replica that stops answering turns the page
// stale (red, a banner, the replica badge) within STALE_MS, whether or not a poll has ended.
function renderFreshness() {
  const el = $("freshness");
  const stale = isStale();
  const seconds = Math.round(silence() / 1000);
  if (!lastOk) {
    el.textContent = stale ? `no answer for ${seconds} s` : "no data yet";
    el.className = "freshness stale";
  } else if (stale) {
    el.textContent = `no answer for ${seconds} s (last update ${clock(lastOk)})`;
    el.className = "freshness stale";
  } else {
    el.textContent = `updated ${clock(lastOk)}`;
    el.className = "freshness";
  }
  el.dataset.stale = String(stale);
  const banner = $("stale");
  if (!stale) {
    // This control plane answers; etcd may not (the same banner: both say what the page shows
    // is not current).
    if (lastRegistry && !lastRegistry.reachable) {
      banner.textContent = registryBanner(lastRegistry);
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
    return;
  }
  // The poll's own error is part of this banner now.
  if ($("error").dataset.source === "poll") $("error").hidden = true;
  const me = lastStats ? lastStats.replica.id : "this control plane";
  const what = lastStats && lastStats.role === "leader"
    ? "another replica may have taken over as leader"
    : "another replica may be leader";
  banner.textContent = `No answer from this control plane (${me}) for ${seconds} s: it may be down or hung, ` +
    `and ${what}. ` +
    (lastOk ? `What this page shows is from ${clock(lastOk)}.` : "The page has no data yet.") +
    (lastError ? ` Last error: ${lastError}.` : "");
  banner.hidden = false;
  if (lastStats) {
    // Its role then, not now: a hung leader may have lost the lead meanwhile.
    const badge = $("replica");
    badge.className = "replica unknown";
    badge.textContent = `${me}: no answer for ${seconds} s (was ${lastStats.role}${lastOk ? ` at ${clock(lastOk)}` : ""})`;
  }
}

// What the page says while etcd does not answer the control plane's reads.
function registryBanner(registry) {
  const since = registry.since_unix_ms ? clock(registry.since_unix_ms) : "now";
  const asOf = registry.as_of_unix_ms
    ? ` Drain requests are as of ${clock(registry.as_of_unix_ms)}.`
    : "";
  return `etcd unreachable since ${since}: showing the membership as last seen ` +
    `(live load is current; drains and policy changes fail until etcd answers).${asOf}` +
    (registry.error ? ` ${registry.error}` : "");
}

/// The button's face: Drain, Confirm drain (armed by a first click), or Undrain.
function renderDrainButton(button, id, action) {
  const confirming = action === "drain" && (armed.get(id) || 0) > Date.now();
  button.className = confirming ? "drain confirm" : action;
  button.textContent = confirming ? "Confirm drain" : action === "drain" ? "Drain" : "Undrain";
  button.title = confirming
    ? `Click again within ${CONFIRM_MS / 1000} s to drain ${id}`
    : action === "drain"
      ? `Stop placing new requests on ${id}; in-flight requests finish (asks to confirm)`
      : `Let ${id} take new requests again`;
}

/// A drain is armed by the first click and sent by the second; an undrain is sent at once.
function onDrainButton(id, button) {
  const action = button.dataset.action;
  if (action === "drain" && !((armed.get(id) || 0) > Date.now())) {
    armed.set(id, Date.now() + CONFIRM_MS);
    renderDrainButton(button, id, action);
    setTimeout(() => {
      if ((armed.get(id) || 0) <= Date.now()) {
        armed.delete(id);
        renderDrainButton(button, id, button.dataset.action);
      }
    }, CONFIRM_MS + 50);
    return;
  }
  armed.delete(id);
  toggleDrain(id, action);
}

async function toggleDrain(id, action) {
  pending.add(id);
  document.querySelectorAll(`tr[data-worker-id="${CSS.escape(id)}"] button`)
    .forEach((b) => { b.disabled = true; });
  try {
    const response = await fetch(`/api/workers/${encodeURIComponent(id)}/${action}`, {
      method: "POST",
      headers: WRITE_HEADERS,
      body: "{}",
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = `${action === "drain" ? "Drain" : "Undrain"} of ${id} failed (HTTP ${response.status}): ${body.error || "no reason given"}`;
      showError(message);
      $("error").dataset.source = "action";
      return;
    }
    showNotice(action === "drain"
      ? `Drain of ${id} requested: it finishes in-flight requests and takes no new ones.`
      : `Drain of ${id} lifted: it takes new requests again.`);
  } catch (error) {
    showError(`${action} of ${id} failed: ${error.message}`);
    $("error").dataset.source = "action";
  } finally {
    pending.delete(id);
    await refresh();
  }
}

// What every write sends: the server's cross-site guard requires the JSON content type and
// the custom header; the session travels in the HttpOnly cookie set by signing in.
const WRITE_HEADERS = { "content-type": "application/json", "x-switchyard-csrf": "1" };

async function refreshSession() {
  const session = await getJson("/api/session").catch(() => null);
  if (!session) return;
  $("login").hidden = !session.required || session.signed_in;
  const who = $("who");
  who.hidden = !session.signed_in;
  who.textContent = "";
  if (session.signed_in) {
    who.append(`signed in as ${session.name} (${session.role}) `);
    const out = document.createElement("button");
    out.textContent = "Sign out";
    out.addEventListener("click", async () => {
      // What was said about the signed-in session (its greeting, a refusal) no longer holds.
      $("notice").hidden = true;
      if ($("error").dataset.source === "action") $("error").hidden = true;
      const response = await fetch("/api/session", { method: "DELETE", headers: WRITE_HEADERS, body: "{}" });
      if (!response.ok) {
        // The cookie is gone, but the server could not end the session (etcd unreachable).
        const body = await response.json().catch(() => ({}));
        showError(`Sign-out (HTTP ${response.status}): ${body.error || "no reason given"}`);
        $("error").dataset.source = "action";
      }
      await refreshSession();
    });
    who.append(out);
  }
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/api/session", {
    method: "POST",
    headers: WRITE_HEADERS,
    body: JSON.stringify({ token: $("token").value }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    showError(`Sign-in failed (HTTP ${response.status}): ${body.error || "no reason given"}`);
    $("error").dataset.source = "action";
    return;
  }
  $("token").value = "";
  showNotice(`Signed in as ${body.name} (${body.role}).`);
  await refreshSession();
});

refreshSession();
refresh();
setInterval(refresh, POLL_MS);
setInterval(renderFreshness, FRESHNESS_TICK_MS);
