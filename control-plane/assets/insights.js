// Switchyard ops dashboard, history and decisions: charts of the last hour drawn as plain SVG
// from /api/history (kept by the control plane, so a reload loses nothing), and the live
// decision feed from /api/decisions with each request's story one click away.
"use strict";

(() => {
  const HISTORY_POLL_MS = 2000;
  const FEED_POLL_MS = 1000;
  const MAX_POINTS = 3600;
  const MAX_ROWS = 200;
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = {
    "latency-critical": "#8250df",
    "cost-sensitive": "#0969da",
    gpu: "#1a7f37",
    wse: "#bc4c00",
    shed: "#cf222e",
    failovers: "#9a6700",
    preempt: "#8250df",
    rebalance: "#0969da",
    drain: "#6a737d",
    cost: "#0550ae",
    prefix: "#1a7f37",
  };
  const LANES = ["latency-critical", "cost-sensitive"];
  const POOLS = ["gpu", "wse"];
  const MOVE_REASONS = ["drain", "preempt", "rebalance"];
  // The routers' API names (an API a newer router adds shows as it names it).
  const API_NAMES = {
    chat_completions: "POST /v1/chat/completions",
    completions: "POST /v1/completions",
    responses: "POST /v1/responses",
    embeddings: "POST /v1/embeddings",
    stored_responses: "/v1/responses/{id} (stored)",
    conversations: "/v1/conversations",
    files: "/v1/files (Batch API)",
    batches: "/v1/batches",
    messages: "POST /v1/messages (Anthropic)",
    count_tokens: "POST /v1/messages/count_tokens",
    tokenize: "POST /tokenize",
    detokenize: "POST /detokenize",
    models: "GET /v1/models",
    unknown: "HTTP, any other path",
    grpc_session: "gRPC Session (per request)",
    grpc_generate: "gRPC Generate",
  };
  const ANSWERS = ["ok", "client_errors", "rate_limited", "server_errors", "cancelled"];

  const $ = (id) => document.getElementById(id);
  let points = [];
  let windowSeconds = 300;
  // Rows of the feed, by key ("<feed>#<id>"). A feed is one replica's leadership term
  // (`feed` in the answer): ids and seq count within it. When the page's replica answers with
  // another feed (the leader changed, or a follower lost its leader), the page follows the
  // new one from its start and keeps the rows it had, marked as the previous keeper's.
  const decisions = new Map();
  let feed = null; // {key, replica, epoch} of the feed followed
  let feedSeq = 0;
  let movedFrom = null; // the feed the page's older rows came from
  const feedOrder = new Map(); // feed key -> rank, newer feeds higher
  let feedRank = 0;
  let selected = null; // row key
  let feedError = ""; // why the last read of the feed failed ("" when it did not)
  // One poll of each kind at a time (a hung replica's polls end only by their timeout).
  const busy = new Set();
  const once = (name, poll) => async () => {
    if (busy.has(name)) return;
    busy.add(name);
    try { await poll(); } finally { busy.delete(name); }
  };

  // getJson comes from app.js (with its request timeout).

  function el(tag, attrs = {}, text) {
    const node = tag.startsWith("svg:")
      ? document.createElementNS(SVG, tag.slice(4))
      : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const fmtMs = (v) => (v == null ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(v < 10 ? 1 : 0)} ms`);
  const fmtPct = (v) => (v == null ? "–" : `${(v * 100).toFixed(1)} %`);
  const fmtNum = (v) => (v == null ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: 1 }));
  const fmtUsd = (v) => (v == null ? "–" : `$${Number(v).toFixed(v < 1 ? 4 : 2)}`);
  // Per-request costs are fractions of a cent: two significant digits, not "$0.0000".
  const fmtUsdFine = (v) => (v == null ? "–" : v === 0 ? "$0" : v < 0.01 ? `$${Number(v).toPrecision(2)}` : fmtUsd(v));

  // One line chart: `series` of {name, color, dash, values: [[t, v or null]]}; gaps (null)
  // break the line. Log scale for latencies, which span milliseconds to seconds.
  function drawChart(id, series, { log = false, format = fmtNum, max, minTop = 1 } = {}) {
    const figure = $(id);
    if (!figure) return;
    const svg = figure.querySelector("svg");
    const W = 360, H = 130, L = 52, R = 6, T = 6, B = 18;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.replaceChildren();
    const now = points.length ? points[points.length - 1].t : Math.floor(Date.now() / 1000);
    const t0 = now - windowSeconds;
    const all = series.flatMap((s) => s.values.filter(([t, v]) => v != null && t > t0).map(([, v]) => v));
    const positive = all.filter((v) => v > 0);
    // An idle chart still gets a readable axis (0 to minTop).
    let lo = 0, hi = max ?? Math.max(minTop, ...all);
    if (log) {
      lo = positive.length ? Math.min(...positive) : 1;
      hi = positive.length ? Math.max(...positive) : 10;
      lo = Math.pow(10, Math.floor(Math.log10(lo)));
      hi = Math.pow(10, Math.ceil(Math.log10(hi)));
      if (hi <= lo) hi = lo * 10;
    } else if (max === undefined) {
      hi *= 1.1;
    }
    const x = (t) => L + ((t - t0) / windowSeconds) * (W - L - R);
    const y = (v) => {
      const f = log ? (Math.log10(Math.max(v, lo)) - Math.log10(lo)) / (Math.log10(hi) - Math.log10(lo)) : (v - lo) / (hi - lo || 1);
      return H - B - Math.min(1, Math.max(0, f)) * (H - T - B);
    };
    svg.appendChild(el("svg:rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
    const ticks = log
      ? Array.from({ length: Math.round(Math.log10(hi / lo)) + 1 }, (_, i) => lo * Math.pow(10, i))
      : [lo, (lo + hi) / 2, hi];
    for (const v of ticks) {
      svg.appendChild(el("svg:line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      svg.appendChild(el("svg:text", { x: L - 4, y: y(v) + 3, class: "tick", "text-anchor": "end" }, format(v)));
    }
    const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    svg.appendChild(el("svg:text", { x: L, y: H - 4, class: "tick" }, clock(t0)));
    svg.appendChild(el("svg:text", { x: W - R, y: H - 4, class: "tick", "text-anchor": "end" }, clock(now)));
    let drawn = 0;
    for (const s of series) {
      let path = "";
      let pen = false;
      for (const [t, v] of s.values) {
        if (t <= t0 || v == null) { pen = false; continue; }
        // A segment's first point gets a dot (a lone second would not show otherwise).
        path += pen
          ? `L${x(t).toFixed(1)},${y(v).toFixed(1)}`
          : `M${x(t).toFixed(1)},${y(v).toFixed(1)}l0.1,0`;
        pen = true;
        drawn += 1;
      }
      if (path) {
        const line = el("svg:path", { d: path, stroke: s.color, class: "series" });
        if (s.dash) line.setAttribute("stroke-dasharray", "4 3");
        line.dataset.series = s.name;
        svg.appendChild(line);
      }
    }
    svg.dataset.points = String(drawn);
    const legend = figure.querySelector(".legend");
    legend.replaceChildren();
    for (const s of series) {
      const last = [...s.values].reverse().find(([t, v]) => v != null && t > t0);
      const item = el("span", { class: "key" });
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = s.color;
      if (s.dash) swatch.classList.add("dash");
      item.append(swatch, `${s.name} ${last ? format(last[1]) : "–"}`);
      legend.appendChild(item);
    }
  }

  const col = (f) => points.map((p) => [p.t, f(p)]);
  // Series the routers report: a second no router reported to this replica (it was not the
  // leader yet, or no router was up) has no data, drawn as a gap, not as a confident 0.
  const reported = (f) => col((p) => (p.routers > 0 ? f(p) : null));

  function drawCharts() {
    drawChart("chart-ttft", LANES.flatMap((lane) => [
      { name: `${lane} p50`, color: COLORS[lane], values: col((p) => p.lanes[lane].ttft_p50_ms) },
      { name: `${lane} p99`, color: COLORS[lane], dash: true, values: col((p) => p.lanes[lane].ttft_p99_ms) },
    ]).concat(LANES.map((lane) => ({
      name: `${lane} SLO`, color: "#6a737d", dash: true, values: col((p) => p.lanes[lane].slo_ms || null),
    }))), { log: true, format: fmtMs });
    drawChart("chart-attainment", LANES.map((lane) => ({
      name: lane, color: COLORS[lane], values: col((p) => p.lanes[lane].attainment),
    })), { format: fmtPct, max: 1 });
    drawChart("chart-itl", LANES.flatMap((lane) => [
      { name: `${lane} p50`, color: COLORS[lane], values: col((p) => p.lanes[lane].itl_p50_ms) },
      { name: `${lane} p99`, color: COLORS[lane], dash: true, values: col((p) => p.lanes[lane].itl_p99_ms) },
    ]), { log: true, format: fmtMs });
    drawChart("chart-prediction", LANES.flatMap((lane) => [
      { name: `${lane} p50`, color: COLORS[lane], values: col((p) => p.lanes[lane].ttft_error_p50_ms) },
      { name: `${lane} p99`, color: COLORS[lane], dash: true, values: col((p) => p.lanes[lane].ttft_error_p99_ms) },
    ]), { log: true, format: fmtMs });
    // Means per judged request in each second (sums / judged), so busy and quiet seconds
    // compare.
    const perRequest = (lane, key) => col((p) => {
      const l = p.ledger && p.ledger.lanes[lane];
      return l && l.judged ? l[key] / l.judged : null;
    });
    drawChart("chart-regret", LANES.flatMap((lane) => [
      { name: `${lane} regret`, color: COLORS[lane], values: perRequest(lane, "regret_ms") },
      { name: `${lane} |error|`, color: COLORS[lane], dash: true, values: perRequest(lane, "abs_prediction_error_ms") },
    ]), { format: fmtMs });
    drawChart("chart-tokens", POOLS.map((pool) => ({
      name: pool, color: COLORS[pool], values: reported((p) => p.pools[pool].tokens_per_s),
    })));
    drawChart("chart-queue", POOLS.map((pool) => ({
      name: `${pool} workers`, color: COLORS[pool], values: col((p) => p.pools[pool].queued),
    })).concat(LANES.map((lane) => ({
      name: `${lane} at router`, color: COLORS[lane], dash: true, values: reported((p) => p.lanes[lane].queued_at_router),
    }))));
    drawChart("chart-shed", [
      { name: "shed/s", color: COLORS.shed, values: reported((p) => LANES.reduce((n, l) => n + p.lanes[l].shed, 0)) },
      { name: "failovers/s", color: COLORS.failovers, values: reported((p) => LANES.reduce((n, l) => n + p.lanes[l].failovers, 0)) },
    ].concat(MOVE_REASONS.map((reason) => ({
      name: `moves/s (${reason})`, color: COLORS[reason], dash: true, values: reported((p) => (p.moves ? p.moves[reason] : 0)),
    }))));
    drawChart("chart-cost", [
      { name: "cost/hour", color: COLORS.cost, values: reported((p) => p.cost_per_hour) },
    ], { format: fmtUsd, minTop: 0.01 });
    drawChart("chart-prefix", [
      { name: "prefix-cache hit rate", color: COLORS.prefix, values: col((p) => p.prefix_hit_rate) },
    ], { format: fmtPct, max: 1 });
    renderSampling();
    renderMoves();
    renderApis();
  }

  // Each API's answers summed over the chosen window, busiest first.
  function renderApis() {
    const t0 = (points.length ? points[points.length - 1].t : 0) - windowSeconds;
    const totals = new Map();
    for (const p of points) {
      if (p.t <= t0 || !p.apis) continue;
      for (const [api, answers] of Object.entries(p.apis)) {
        const sum = totals.get(api) || Object.fromEntries(ANSWERS.map((k) => [k, 0]));
        for (const k of ANSWERS) sum[k] += answers[k] || 0;
        totals.set(api, sum);
      }
    }
    const span = windowSeconds >= 3600 ? "hour" : `${windowSeconds / 60} min`;
    $("apis-window").textContent = `(last ${span})`;
    const rows = [...totals.entries()]
      .map(([api, sum]) => ({ api, sum, requests: ANSWERS.reduce((n, k) => n + sum[k], 0) }))
      .sort((a, b) => b.requests - a.requests || a.api.localeCompare(b.api));
    const num = (v, trouble) => el("td", { class: trouble && v > 0 ? "num bad" : "num" }, fmtNum(v));
    $("apis").querySelector("tbody").replaceChildren(...rows.map(({ api, sum, requests }) => {
      const errors = sum.client_errors + sum.rate_limited + sum.server_errors;
      const tr = el("tr", { "data-api": api });
      for (const k of ANSWERS) tr.dataset[k.replace(/_(.)/g, (_, c) => c.toUpperCase())] = String(sum[k]);
      tr.append(
        el("td", {}, API_NAMES[api] || api),
        num(requests),
        num(sum.ok),
        num(sum.client_errors),
        num(sum.rate_limited),
        num(sum.server_errors, true),
        num(sum.cancelled),
        el("td", { class: errors ? "num bad" : "num" }, fmtPct(requests ? errors / requests : null)),
      );
      return tr;
    }));
    $("no-apis").hidden = rows.length > 0;
  }

  // Moves by reason over the chosen window, beside the feed that shows each one.
  function renderMoves() {
    const t0 = (points.length ? points[points.length - 1].t : 0) - windowSeconds;
    const recent = points.filter((p) => p.t > t0 && p.moves);
    const counts = MOVE_REASONS.map((reason) => [reason, recent.reduce((n, p) => n + (p.moves[reason] || 0), 0)]);
    const span = windowSeconds >= 3600 ? "hour" : `${windowSeconds / 60} min`;
    $("moves").textContent = `Moves by the router's order in the last ${span}: ` +
      counts.map(([reason, n]) => `${reason} ${fmtNum(n)}`).join(", ") + ".";
    for (const [reason, n] of counts) $("moves").dataset[reason] = String(n);
  }

  // What the feed shows of what the routers decided in the last minute.
  function renderSampling() {
    const recent = points.slice(-60);
    const sum = (k) => recent.reduce((n, p) => n + p[k], 0);
    const made = sum("decisions"), shown = sum("decisions_reported"), dropped = sum("dropped");
    // A router's once-a-second report can land in the next second's point, leaving one at 0:
    // the most seen over the last 5 s, so the count does not flicker.
    const routers = recent.slice(-5).reduce((n, p) => Math.max(n, p.routers), 0);
    const text = made === 0
      ? `No routing decision in the last minute (${routers} router${routers === 1 ? "" : "s"} reporting).`
      : `Last minute: ${fmtNum(made)} decision${made === 1 ? "" : "s"}, ${fmtNum(shown)} in the feed` +
        (shown < made ? ` (sampled: ${fmtPct(shown / made)})` : " (all)") +
        (dropped ? `, ${fmtNum(dropped)} reports dropped (queue full)` : "") +
        `; ${routers} router${routers === 1 ? "" : "s"} reporting.`;
    $("sampling").textContent = text;
  }

  // Since when the leader keeps router data, when the history holds earlier seconds (a
  // failover: the earlier ones were kept by another replica and are gaps here).
  function sinceNotice(keptBy) {
    const el = $("insights-since");
    const since = keptBy && keptBy.since;
    if (!since || !points.length || points[0].t >= since) { el.hidden = true; return; }
    el.hidden = false;
    el.dataset.since = String(since);
    const who = keptBy.leader ? keptBy.leader.id : "the leader";
    el.textContent = `${who} has led since ${stamp(since * 1000)}: routers report to the leader, so it has no router data (tokens, cost, queues at routers, decisions) before then; those seconds are gaps.`;
  }

  function keeperNotice(keptBy) {
    sinceNotice(keptBy);
    const el = $("insights-keeper");
    if (!keptBy || (keptBy.role === "leader" && !keptBy.via)) { el.hidden = true; return; }
    el.hidden = false;
    if (keptBy.via) {
      el.textContent = `Routers report to the leader${keptBy.leader ? ` (${keptBy.leader.id})` : ""}: this follower shows its history, ledger and feed.`;
      return;
    }
    el.textContent = "Routers report to the leader, which cannot be reached: this follower's own history and feed start when it leads. ";
    if (keptBy.leader && keptBy.leader_dashboard) {
      const link = document.createElement("a");
      link.href = keptBy.leader_dashboard;
      link.textContent = `Open the leader's dashboard (${keptBy.leader.id})`;
      el.appendChild(link);
    }
  }

  // The ledger over the chosen window: one explanation line per lane, a row per lane, pool
  // and tenant.
  async function refreshLedger() {
    try {
      const body = await getJson(`/api/ledger?window_s=${windowSeconds}`);
      $("ledger-window").textContent = `(last ${windowSeconds >= 3600 ? "hour" : `${windowSeconds / 60} min`})`;
      const explanation = $("ledger-explanation");
      explanation.replaceChildren(...body.rows
        .filter((r) => r.dimension === "lane")
        .map((r) => {
          const item = el("li", { "data-lane": r.key });
          item.append(el("b", {}, `${r.key}: `), r.explanation);
          return item;
        }));
      const tbody = $("ledger").querySelector("tbody");
      const rows = body.rows.filter((r) => r.judged > 0);
      // A tenant's name is the client's (up to 254 bytes): cut with an ellipsis, whole in
      // the tooltip, so the numbers stay in view.
      const keyCell = (key) => {
        const cell = td("", "mono");
        cell.append(el("span", { class: "clip", title: key }, key));
        return cell;
      };
      tbody.replaceChildren(...rows.map((r) => {
        const tr = el("tr");
        tr.dataset.dimension = r.dimension;
        tr.dataset.key = r.key;
        const capacity = r.slo_missed - r.missed_predicted_to_meet - r.missed_with_alternative;
        tr.append(
          td(r.dimension), keyCell(r.key), td(fmtNum(r.judged), "num"),
          td(fmtNum(r.with_alternative), "num"), td(fmtMs(r.regret_ms_mean), "num"),
          td(fmtMs(r.chosen_slower_ms_mean), "num"), td(fmtMs(r.abs_prediction_error_ms_mean), "num"),
          td(r.prediction_error_ms_mean == null ? "–" : `${r.prediction_error_ms_mean >= 0 ? "+" : "−"}${fmtMs(Math.abs(r.prediction_error_ms_mean))}`, "num"),
          td(fmtUsdFine(r.cost_usd), "num"), td(fmtUsdFine(r.cost_regret_usd), "num"),
          td(`${fmtNum(r.slo_missed)} (${fmtNum(r.missed_predicted_to_meet)} / ${fmtNum(r.missed_with_alternative)} / ${fmtNum(capacity)})`, "num"),
          td(r.loses_slo, r.loses_slo === "none" ? "good" : "bad"),
        );
        return tr;
      }));
      $("no-ledger").hidden = rows.length > 0;
    } catch (error) {
      $("no-ledger").hidden = false;
      $("no-ledger").textContent = `Cannot read the ledger: ${error.message}`;
    }
  }

  async function refreshHistory() {
    try {
      const since = points.length ? `?since=${points[points.length - 1].t}` : "";
      const body = await getJson(`/api/history${since}`);
      points = points.concat(body.points).slice(-MAX_POINTS);
      keeperNotice(body.kept_by);
      drawCharts();
    } catch (error) {
      $("sampling").textContent = `Cannot read the history: ${error.message}`;
    }
  }

  function td(text, className) {
    const cell = document.createElement("td");
    if (className) cell.className = className;
    cell.textContent = text;
    return cell;
  }

  function laneText(d) {
    return d.lane_detail ? `${d.lane} (${d.lane_origin} ${d.lane_detail})` : `${d.lane} (${d.lane_origin})`;
  }

  // A cell cut to its column's width with an ellipsis; the full text in its tooltip.
  function clipped(text, className) {
    const cell = td(text, className ? `clip ${className}` : "clip");
    cell.title = text;
    return cell;
  }

  // The lane and where it came from, on up to two lines: a long tenant or rule name is cut.
  function laneCell(d) {
    const text = laneText(d);
    const cell = td(text.length > 48 ? `${text.slice(0, 47)}…` : text, "wrap");
    cell.title = text;
    return cell;
  }

  // Ended failed, rejected or shed without a token: nothing was computed (it costs nothing).
  const producedNothing = (o) =>
    !o.ttft_ms && !o.completion_tokens && ["failed", "rejected", "shed"].includes(o.status);

  // The TTFT SLO's verdict on an ended request, as the history counts it: a request refused
  // before its first token (failed, rejected) is not judged; a shed one is a miss (the
  // cluster turned it away); a cancelled one is not judged.
  function sloVerdict(o) {
    if (o.status === "cancelled") return "not judged, cancelled";
    if (producedNothing(o) && o.status !== "shed") return `not applicable, ${o.status} before its first token`;
    if (o.status === "shed") return "missed, shed";
    const verdict = o.slo_met ? "met" : "missed";
    return o.status === "failed" ? `${verdict}, then failed` : verdict;
  }

  // A row the current feed's keeper does not have: recorded by an earlier leader (or by this
  // follower while it could not reach the leader). Its outcome, if it ended after the
  // change, went to the new keeper, which has no decision to attach it to.
  const previous = (d) => !feed || d.feed !== feed.key;
  const unknownOutcome = (d) =>
    `Outcome unknown: recorded by ${d.keeper}, which no longer keeps the feed; a request still ` +
    "running then was reported ending to the leader after it, which has no record of its decision.";

  function sloCell(d) {
    const o = d.outcome;
    if (!o && previous(d)) {
      const cell = td("unknown", "muted");
      cell.title = unknownOutcome(d);
      return cell;
    }
    if (!o) return td("running", "muted");
    if (o.status === "cancelled") return td("cancelled", "muted");
    // A request that did not complete shows how it ended, like its status; the tooltip
    // gives the SLO's verdict.
    const cell = ["shed", "rejected", "failed"].includes(o.status)
      ? td(o.status, "bad")
      : td(o.slo_met ? "met" : "missed", o.slo_met ? "good" : "bad");
    cell.title = `TTFT SLO ${fmtMs(d.ttft_slo_ms)}: ${sloVerdict(o)}`;
    return cell;
  }

  const moveText = (m) => `moved (${m.reason}) ${m.from_worker_id} → ${m.to_worker_id} at token ${m.at_token}`;

  // The worker it was placed on, and where the router moved it after.
  function workerCell(d) {
    const cell = td(d.worker_id ? `${d.worker_id} (${d.pool})` : "–", "mono wrap");
    for (const m of (d.outcome && d.outcome.moves) || []) cell.append(el("div", { class: "move" }, moveText(m)));
    return cell;
  }

  function renderFeed() {
    const body = $("decisions").querySelector("tbody");
    const trouble = $("only-trouble").checked;
    const entries = [...decisions.values()]
      .filter((d) => !trouble || (d.outcome && d.outcome.status !== "cancelled" && !d.outcome.slo_met))
      .sort(newestFirst)
      .slice(0, MAX_ROWS);
    // The rows are drawn anew: the one the keyboard was on keeps the focus.
    const focused = body.contains(document.activeElement) ? document.activeElement.dataset.key : null;
    body.replaceChildren();
    for (const d of entries) {
      const tr = document.createElement("tr");
      tr.dataset.requestId = d.request_id;
      tr.dataset.id = String(d.id);
      tr.dataset.feed = d.feed;
      const classes = [];
      if (selected === d.key) classes.push("selected");
      if (previous(d)) {
        classes.push("previous");
        tr.dataset.previous = "true";
        tr.title = `Recorded by ${d.keeper}, before the feed moved to ${feed ? feed.replica : "another replica"}`;
      }
      tr.className = classes.join(" ");
      const when = td("", "num when");
      when.append(timeElement(d.at_unix_ms));
      tr.append(
        when,
        clipped(d.request_id, "mono"),
        clipped(d.tenant || "–"),
        laneCell(d),
        workerCell(d),
        clipped(d.reason),
        td(d.worker_id ? fmtMs(d.predicted_ttft_ms) : "–", "num"),
        td(d.outcome && d.outcome.ttft_ms ? fmtMs(d.outcome.ttft_ms) : "–", "num"),
        sloCell(d),
      );
      // A row opens its story from the keyboard too (Tab to it, Enter or Space), not only on
      // a click.
      tr.dataset.key = d.key;
      tr.tabIndex = 0;
      const open = () => { selected = d.key; renderFeed(); renderStory(); };
      tr.addEventListener("click", open);
      tr.addEventListener("keydown", (event) => {
        if (event.key !== "Enter" && event.key !== " ") return;
        event.preventDefault();
        open();
      });
      body.appendChild(tr);
      // Without scrolling: new rows above must not make the list jump after it.
      if (d.key === focused) tr.focus({ preventScroll: true });
    }
    renderFeedNote(entries.length);
  }

  // The line under the feed: why no row shows (none reported yet, or none the filter keeps),
  // or that the feed cannot be read, until it can again.
  function renderFeedNote(shown) {
    const note = $("no-decisions");
    note.hidden = shown > 0 && !feedError;
    note.textContent = feedError
      ? `Cannot read the decision feed: ${feedError}`
      : decisions.size
        ? `No SLO miss, shed or failed request among the ${decisions.size} latest decisions.`
        : "No decision reported yet: routers report once they reach this control plane.";
  }

  function dl(pairs) {
    const list = document.createElement("dl");
    for (const [k, v] of pairs) list.append(el("dt", {}, k), el("dd", {}, v));
    return list;
  }

  // The ledger's word on one request (see the ledger section).
  function regretText(o) {
    if (o.regret_ms == null) return "not judged (no first token, or it failed over)";
    if (!o.best_alternative_worker_id) return `${fmtMs(o.regret_ms)} (no other worker was scored)`;
    return `${fmtMs(o.regret_ms)} vs the best alternative ${o.best_alternative_worker_id} (predicted ${fmtMs(o.best_alternative_ttft_ms)})`;
  }

  // One request's story: its lane and why, what the router weighed, what it chose, what
  // happened.
  function renderStory() {
    const story = $("story");
    const d = decisions.get(selected);
    if (!d) { story.hidden = true; return; }
    story.hidden = false;
    const parts = [el("h3", {}, `Request ${d.request_id}`)];
    parts.push(el("h4", {}, "1. Lane"), dl([
      ["lane", d.lane],
      ["decided by", d.lane_detail ? `${d.lane_origin} ${d.lane_detail}` : d.lane_origin],
      ["TTFT SLO", fmtMs(d.ttft_slo_ms)],
      ["tenant", d.tenant || "–"],
      ["model", d.model],
      ["prompt tokens", fmtNum(d.prompt_tokens)],
      ["router", d.router_id],
    ]));
    parts.push(el("h4", {}, "2. Candidates the policy scored"));
    if (d.candidates.length) {
      const table = el("table", { class: "grid candidates" });
      const head = el("tr");
      for (const h of ["worker", "pool", "predicted TTFT", "cached tokens", "$/Mtok", "score", "meets SLO"]) head.append(el("th", {}, h));
      table.append(head);
      for (const c of d.candidates) {
        const tr = el("tr", c.chosen ? { class: "chosen" } : {});
        tr.dataset.workerId = c.worker_id;
        tr.append(
          td(c.worker_id + (c.chosen ? " ✔ chosen" : "") + (c.affinity ? " (affinity)" : ""), "mono"),
          td(c.pool), td(fmtMs(c.predicted_ttft_ms), "num"), td(fmtNum(c.cached_tokens), "num"),
          td(Number(c.cost_per_mtok).toFixed(2), "num"), td(fmtNum(c.score), "num"),
          td(c.meets_slo ? "yes" : "no", c.meets_slo ? "good" : "bad"),
        );
        table.append(tr);
      }
      parts.push(table);
    } else {
      parts.push(el("p", { class: "muted" }, "None: the request never reached placement."));
    }
    parts.push(el("h4", {}, "3. Choice"), dl([
      ["worker", d.worker_id ? `${d.worker_id} (${d.pool})` : "none"],
      ["reason", d.reason],
      ["in full", d.reason_text],
      ["predicted TTFT", d.worker_id ? fmtMs(d.predicted_ttft_ms) : "–"],
      ["waited at the router", fmtMs(d.queued_ms)],
    ]));
    parts.push(el("h4", {}, "4. Outcome"));
    const o = d.outcome;
    if (o) {
      parts.push(dl([
        ["status", o.status + (o.error ? `: ${o.error}` : "")],
        ["finished on", o.worker_id ? `${o.worker_id} (${o.pool})` : "–"],
        ["TTFT", `${o.ttft_ms ? fmtMs(o.ttft_ms) : "–"} (SLO ${fmtMs(d.ttft_slo_ms)}: ${sloVerdict(o)})`],
        ["prediction", o.placed_ttft_ms
          ? `${fmtMs(o.predicted_ttft_ms)} predicted, ${fmtMs(o.placed_ttft_ms)} from placement (${o.placed_ttft_ms > o.predicted_ttft_ms ? "late" : "early"} by ${fmtMs(Math.abs(o.placed_ttft_ms - o.predicted_ttft_ms))})`
          : "–"],
        ["regret", regretText(o)],
        ["cost regret", o.cost_regret_usd == null ? "–" : fmtUsdFine(o.cost_regret_usd)],
        ["inter-token latency", fmtMs(o.itl_ms)],
        ["tokens", `${fmtNum(o.prompt_tokens)} prompt (${fmtNum(o.cached_prompt_tokens)} cached), ${fmtNum(o.completion_tokens)} generated`],
        ["failovers", fmtNum(o.failovers)],
        ["moves", o.moves && o.moves.length
          ? o.moves.map((m) => `${moveText(m)} (${stamp(m.at_unix_ms)})`).join("; ")
          : "none"],
        ["total", fmtMs(o.total_ms)],
        ["cost", producedNothing(o)
          ? `${fmtUsdFine(o.cost_usd)} (nothing computed: no token was produced)`
          : `${fmtUsd(o.cost_usd)} ((prompt + generated tokens) × the worker's $/Mtok)`],
      ]));
    } else if (previous(d)) {
      parts.push(el("p", { class: "muted" }, unknownOutcome(d)));
    } else {
      parts.push(el("p", { class: "muted" }, "Still running (or its outcome was not reported)."));
    }
    story.replaceChildren(...parts);
  }

  // Rows of the newest feed first, then by id (arrival) within a feed.
  function newestFirst(a, b) {
    return (feedOrder.get(b.feed) || 0) - (feedOrder.get(a.feed) || 0) || b.id - a.id;
  }

  // The feed moved (another leader, or this replica's own while it cannot reach the leader):
  // follow the new one from its start (the answer, asked with the old cursor, is complete:
  // the server answers a cursor into another feed from the start), keep the old rows.
  function switchFeed(next, keptBy) {
    // The feed the rows on the page came from: an empty one in between (a follower's own
    // while the leader was away) does not count.
    if (feed && [...decisions.values()].some((d) => d.feed === feed.key)) movedFrom = feed;
    feed = next;
    feedSeq = 0;
    feedOrder.set(next.key, ++feedRank);
    // Rows of this feed seen before come again, fresh.
    for (const [key, d] of decisions) if (d.feed === next.key) decisions.delete(key);
    const note = $("feed-moved");
    const before = movedFrom;
    if (!before || before.key === next.key) { note.hidden = true; return; }
    const leader = keptBy && keptBy.role === "leader";
    const who = leader
      ? `the leader ${next.replica}`
      : `${next.replica} (this follower's own: it cannot reach the leader)`;
    const since = leader && next.epoch ? ` (leading since ${stamp(next.epoch)})` : "";
    note.textContent = `The decision feed moved at ${new Date().toLocaleTimeString()} from ${before.replica} to ${who}${since}. ` +
      `Rows recorded by ${before.replica} are kept below the new ones; a request still running then shows its outcome as unknown.`;
    note.dataset.from = before.replica;
    note.dataset.to = next.replica;
    note.hidden = false;
  }

  async function refreshFeed() {
    try {
      const cursor = feed ? `since=${feedSeq}&epoch=${feed.epoch}` : "since=0";
      const body = await getJson(`/api/decisions?${cursor}`);
      const named = body.feed || { replica: "the control plane", epoch: 0 };
      const next = { key: `${named.replica}/${named.epoch}`, replica: named.replica, epoch: named.epoch };
      const moved = !feed || next.key !== feed.key || body.reset;
      if (moved) switchFeed(next, body.kept_by);
      for (const d of body.decisions) {
        d.feed = next.key;
        d.keeper = next.replica;
        d.key = `${next.key}#${d.id}`;
        decisions.set(d.key, d);
      }
      feedSeq = body.seq;
      // Bounded like the server's feed: the newest rows stay.
      const rows = [...decisions.values()].sort(newestFirst);
      for (const d of rows.slice(500)) decisions.delete(d.key);
      const recovered = feedError !== "";
      feedError = "";
      if (body.decisions.length || moved || recovered) {
        renderFeed();
        if (selected !== null) renderStory();
      }
    } catch (error) {
      feedError = error.message;
      renderFeed();
    }
  }

  for (const button of document.querySelectorAll("#window button")) {
    button.addEventListener("click", () => {
      windowSeconds = Number(button.dataset.seconds);
      document.querySelectorAll("#window button").forEach((b) => b.classList.toggle("on", b === button));
      drawCharts();
      refreshLedger();
    });
  }

  $("only-trouble").addEventListener("change", renderFeed);

  const pollHistory = once("history", refreshHistory);
  const pollLedger = once("ledger", refreshLedger);
  const pollFeed = once("feed", refreshFeed);
  pollHistory();
  pollFeed();
  pollLedger();
  setInterval(pollHistory, HISTORY_POLL_MS);
  setInterval(pollLedger, HISTORY_POLL_MS);
  setInterval(pollFeed, FEED_POLL_MS);
})();
