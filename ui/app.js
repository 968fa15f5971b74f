// Flywheel's dashboard: one page that reads its path and draws itself from the admin JSON API.
// Text from the log (prompts, tool arguments) only ever goes into the page as text nodes.
"use strict";

const app = document.getElementById("app");
const statusLine = document.getElementById("status");
let refreshTimer = null;
let charts = [];

// ---- helpers -------------------------------------------------------------------------------

/** An element with attributes and children; strings become text nodes, never markup. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options) {
  const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
  if (opts.method && opts.method !== "GET") {
    opts.headers["x-flywheel-csrf"] = "1";
    if (opts.body !== undefined) {
      opts.headers["content-type"] = "application/json";
      opts.body = JSON.stringify(opts.body);
    }
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

const fmt = {
  num(v, digits = 0) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    return Number(v).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
  },
  ms(v) { return v === null || v === undefined ? "–" : (v >= 100 ? fmt.num(v, 0) : fmt.num(v, v >= 10 ? 1 : 2)) + " ms"; },
  pct(v) { return v === null || v === undefined ? "–" : fmt.num(v * 100, 1) + "%"; },
  time(ms) { return ms ? new Date(ms).toLocaleString() : "–"; },
  target(t) {
    if (!t) return "–";
    if (t.local) return t.adapter ? `local ${t.local} + ${t.adapter}` : `local ${t.local}`;
    if (t.upstream) return `${t.upstream}:${t.model || ""}`;
    return JSON.stringify(t);
  },
};

function tile(label, value) {
  return el("div", { class: "tile" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value));
}

function pill(text, kind) { return el("span", { class: "pill " + (kind || "") }, text); }

function link(path, text) {
  return el("a", { href: path, onclick: (ev) => { if (ev.button === 0 && !ev.metaKey && !ev.ctrlKey) { ev.preventDefault(); go(path); } } }, text);
}

function table(headers, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c, i) => el("td", { class: headers[i] && headers[i].num ? "num" : null }, c))))));
}

function errorBox(e) { return el("div", { class: "error", role: "alert" }, e.message || String(e)); }

function pre(value) { return el("pre", {}, typeof value === "string" ? value : JSON.stringify(value, null, 2)); }

/**
 * A uPlot line chart of `series` ({label, values}) over `xs`, with optional horizontal
 * `thresholds` ({label, value}). `opts.range` ([from, to], ms) fixes a time axis to the window,
 * so a lone point sits at its time and a guard spans the window; `opts.steps` makes the x axis a
 * plain count. The container says how many points it drew (data-points).
 */
function chart(title, xs, series, thresholds, opts) {
  opts = opts || {};
  const box = el("div", { class: "chart card" }, el("h3", {}, title));
  const points = series.reduce((n, s) => n + s.values.filter((v) => v !== null && v !== undefined).length, 0);
  box.dataset.points = String(points);
  box.dataset.chart = title;
  if (!xs.length || !points) {
    box.append(el("div", { class: "empty" }, "no data in this window"));
    return box;
  }
  let x = opts.steps ? xs.slice() : xs.map((t) => t / 1000);
  let ys = series.map((s) => s.values.map((v) => (v === undefined ? null : v)));
  if (opts.range) {
    const [from, to] = opts.range.map((t) => t / 1000);
    x = [from, ...x, to];
    ys = ys.map((v) => [null, ...v, null]);
  }
  const data = [x, ...ys];
  const colors = ["#2962c4", "#d9822b", "#1b7f3b", "#8e44ad", "#b3261e"];
  const few = points / Math.max(1, series.length) < 3;
  const config = {
    width: 440, height: 180,
    scales: { x: { time: !opts.steps } },
    series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: colors[i % colors.length], width: 2, points: { show: few } }))],
    axes: [{}, { size: 60 }],
    legend: { show: true },
  };
  for (const t of thresholds || []) {
    if (t.value === null || t.value === undefined) continue;
    data.push(x.map(() => t.value));
    config.series.push({ label: t.label, stroke: "#b3261e", dash: [6, 4], width: 1, points: { show: false } });
  }
  requestAnimationFrame(() => {
    if (!box.isConnected) return;
    config.width = Math.max(300, box.clientWidth - 32);
    charts.push(new uPlot(config, data, box));
  });
  return box;
}

function setStatus(text) { statusLine.textContent = text; }

// ---- routing -------------------------------------------------------------------------------

function go(path) {
  history.pushState(null, "", path);
  render();
}

window.addEventListener("popstate", render);

const pages = {
  overview: overviewPage,
  traffic: trafficPage,
  runs: runsPage,
  rollouts: rolloutsPage,
  adapters: adaptersPage,
  rails: railsPage,
  jobs: jobsPage,
};

async function render() {
  if (refreshTimer) clearInterval(refreshTimer);
  refreshTimer = null;
  charts.forEach((c) => c.destroy());
  charts = [];
  const parts = location.pathname.replace(/^\/ui\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const name = parts[0] || "overview";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("current", a.dataset.page === name));
  const page = pages[name];
  const params = new URLSearchParams(location.search);
  app.replaceChildren(el("p", { class: "muted" }, "Loading…"));
  if (!page) {
    app.replaceChildren(errorBox(new Error(`No page '${name}'.`)));
    return;
  }
  try {
    await page(parts.slice(1), params);
    setStatus("updated " + new Date().toLocaleTimeString());
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) loginPage();
    else app.replaceChildren(errorBox(e));
  }
}

/** Re-runs `draw` every `seconds` while this page is shown (and the tab is visible). */
function live(draw, seconds) {
  refreshTimer = setInterval(async () => {
    if (document.hidden) return;
    try {
      await draw();
      setStatus("updated " + new Date().toLocaleTimeString());
    } catch (e) {
      setStatus("update failed: " + e.message);
    }
  }, seconds * 1000);
}

function loginPage() {
  const key = el("input", { type: "password", name: "key", autocomplete: "current-password", placeholder: "API key with the admin scope" });
  const msg = el("div");
  const form = el("form", {
    class: "card login", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        await api("/ui/login", { method: "POST", body: { key: key.value } });
        render();
      } catch (e) {
        msg.replaceChildren(errorBox(e));
      }
    },
  }, el("h1", {}, "Sign in"), el("p", { class: "muted" }, "The dashboard needs an API key with the admin scope."), msg, key, " ", el("button", { class: "primary", type: "submit" }, "Sign in"));
  app.replaceChildren(form);
}

// ---- overview ------------------------------------------------------------------------------

const WINDOWS = ["1h", "6h", "1d", "1w"];

async function overviewPage(_, params) {
  const win = params.get("window") || "1h";
  const head = el("div", {},
    el("h1", {}, "Overview"),
    el("div", { class: "windows" }, "Window: ", WINDOWS.map((w) => el("a", { class: w === win ? "current" : null, href: `/ui/overview?window=${w}`, onclick: (ev) => { ev.preventDefault(); go(`/ui/overview?window=${w}`); } }, w))));
  const body = el("div");
  app.replaceChildren(head, body);
  const draw = async () => {
    const v = await api(`/v1/dashboard/overview?window=${encodeURIComponent(win)}`);
    charts.forEach((c) => c.destroy());
    charts = [];
    body.replaceChildren(...v.routes.map((r) => routeCard(r, v)));
  };
  await draw();
  live(draw, 5);
}

function routeCard(r, v) {
  const t = r.totals;
  const rollout = r.rollout || {};
  const times = r.series.map((p) => p.t_ms);
  const range = [v.since_ms, v.until_ms];
  const arms = [
    el("span", {}, "champion: ", el("b", {}, fmt.target(rollout.champion))),
    rollout.canary ? el("span", {}, " · canary ", fmt.num(rollout.canary.percent, 0), "%: ", el("b", {}, fmt.target(rollout.canary.target))) : null,
    rollout.shadow ? el("span", {}, " · shadow: ", el("b", {}, fmt.target(rollout.shadow.target))) : null,
  ];
  return el("section", { class: "card", "data-route": r.route },
    el("h2", {}, "Route ", r.route),
    el("div", { class: "muted" }, arms),
    el("div", { class: "tiles" },
      tile("requests", fmt.num(t.requests)),
      tile("requests / s", fmt.num(t.requests_per_sec, 2)),
      tile("error rate", fmt.pct(t.error_rate)),
      tile("latency p50 / p95", `${fmt.ms(t.latency_ms.p50)} / ${fmt.ms(t.latency_ms.p95)}`),
      tile("first token p50", fmt.ms(t.ttft_ms.p50)),
      tile("gateway overhead p50 / p95", `${fmt.ms(t.overhead_ms.p50)} / ${fmt.ms(t.overhead_ms.p95)}`),
      tile("tokens in / out", `${fmt.num(t.prompt_tokens)} / ${fmt.num(t.completion_tokens)}`)),
    el("div", { class: "charts" },
      chart(`requests per ${v.step_ms / 60000} min`, times, [{ label: "requests", values: r.series.map((p) => p.requests) }, { label: "errors", values: r.series.map((p) => p.errors) }], [], { range }),
      chart("latency (ms)", times, [{ label: "p50", values: r.series.map((p) => p.latency_ms.p50) }, { label: "p95", values: r.series.map((p) => p.latency_ms.p95) }], [], { range }),
      chart("gateway overhead (ms)", times, [{ label: "p50", values: r.series.map((p) => p.overhead_ms.p50) }, { label: "p95", values: r.series.map((p) => p.overhead_ms.p95) }], [], { range })));
}

// ---- traffic -------------------------------------------------------------------------------

const FILTERS = ["route", "workload", "arm", "status", "tool", "verdict", "q"];
const SPANS = { "1h": 3600e3, "1d": 86400e3, "1w": 7 * 86400e3, "30d": 30 * 86400e3 };

async function trafficPage(parts, params) {
  if (parts[0]) return exchangePage(parts[0]);
  const routes = (await api("/admin/routes")).data.map((r) => r.name);
  const field = (name, input) => el("label", {}, name, input);
  const select = (name, options) => {
    const s = el("select", { name }, el("option", { value: "" }, "any"), options.map((o) => el("option", { value: o }, o)));
    s.value = params.get(name) || "";
    return s;
  };
  const text = (name, placeholder) => el("input", { name, placeholder, value: params.get(name) || "" });
  const form = el("form", {
    class: "filters", onsubmit: (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams();
      for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
      go("/ui/traffic" + (q.toString() ? "?" + q : ""));
    },
  },
    field("route", select("route", routes)),
    field("workload", text("workload", "workload id")),
    field("arm", select("arm", ["champion", "canary", "shadow", "direct"])),
    field("status", select("status", ["ok", "error"])),
    field("tool", text("tool", "tool name")),
    field("rails verdict", select("verdict", ["blocked", "allowed", "none"])),
    field("text", text("q", "3+ characters…")),
    field("within the last", (() => {
      const s = el("select", { name: "span" }, Object.keys(SPANS).map((k) => el("option", { value: k }, k)));
      s.value = params.get("span") || "1d";
      return s;
    })()),
    el("button", { class: "primary", type: "submit" }, "Search"));
  const results = el("div");
  app.replaceChildren(el("h1", {}, "Traffic"), form, results);
  const query = new URLSearchParams();
  for (const k of FILTERS) if (params.get(k)) query.set(k, params.get(k));
  if (params.get("cursor")) query.set("cursor", params.get("cursor"));
  query.set("since_ms", String(Date.now() - (SPANS[params.get("span")] || SPANS["1d"])));
  try {
    const v = await api("/v1/dashboard/traffic?" + query);
    const rows = v.data.map((r) => [
      link(`/ui/traffic/${encodeURIComponent(r.id)}`, fmt.time(r.ts_ms)),
      r.route, r.arm,
      pill(String(r.status), r.status < 400 ? "good" : "bad"),
      fmt.ms(r.latency_ms),
      r.tools.join(", "),
      r.rails ? pill(r.rails, r.rails === "blocked" ? "bad" : "") : "",
      el("span", { class: "prompt" }, r.prompt),
    ]);
    results.replaceChildren(
      v.data.length ? table(["time", "route", "arm", "status", { label: "latency", num: true }, "tools", "rails", "prompt"], rows) : el("p", { class: "muted" }, "No request matches."),
      v.next_cursor && v.data.length < Number(query.get("limit") || 50) ? el("p", { class: "muted" }, `Searched back to ${fmt.time(Number(v.next_cursor.split(".")[0]))}; the search goes on from there.`) : null,
      v.next_cursor ? el("p", {}, link(`/ui/traffic?${new URLSearchParams([...params.entries()].filter(([k]) => k !== "cursor").concat([["cursor", v.next_cursor]]))}`, "Older →")) : null);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) throw e;
    results.replaceChildren(errorBox(e));
  }
}

function messages(list) {
  return (list || []).map((m) => el("div", { class: "message" },
    el("div", { class: "role" }, m.role || ""),
    typeof m.content === "string" ? el("div", {}, m.content) : m.content ? pre(m.content) : null,
    (m.tool_calls || []).map((c) => el("div", {}, "→ ", el("b", {}, (c.function || {}).name || ""), " ", el("code", {}, (c.function || {}).arguments || "")))));
}

async function exchangePage(id) {
  const v = await api(`/v1/dashboard/traffic/${encodeURIComponent(id)}`);
  const x = v.exchange;
  const answer = x.response && x.response.choices ? x.response.choices.map((c) => c.message || {}) : [];
  app.replaceChildren(
    el("h1", {}, "Exchange ", x.id),
    el("p", {}, link("/ui/traffic", "← traffic")),
    el("div", { class: "card" }, table(["field", "value"], [
      ["time", fmt.time(x.timestamp_ms)], ["route / arm", `${x.route} / ${x.arm}`],
      ["target", `${x.target || ""} ${x.target_model || ""} ${x.adapter || ""}`], ["door", x.api],
      ["status", String(x.status)], ["latency", fmt.ms(x.latency_ms)], ["upstream", fmt.ms(x.upstream_ms)],
      ["first token", fmt.ms(x.ttft_ms)], ["tokens in / out", `${fmt.num(x.usage.prompt_tokens)} / ${fmt.num(x.usage.completion_tokens)}`],
      ["workload / episode", `${x.workload_id || "–"} / ${x.episode_id || "–"}`],
    ])),
    el("h2", {}, "Request"), el("div", { class: "card" }, messages((x.request || {}).messages)),
    el("h2", {}, "Response"), el("div", { class: "card" }, answer.length ? messages(answer) : pre(x.error || x.response)),
    el("h2", {}, "Tool calls"),
    x.tool_calls.length ? table(["name", "arguments", "valid JSON"], x.tool_calls.map((c) => [c.name, el("code", {}, c.arguments), c.arguments_valid_json ? pill("yes", "good") : pill("no", "bad")])) : el("p", { class: "muted" }, "none"),
    el("h2", {}, "Rails verdict"), x.rails ? pre(x.rails) : el("p", { class: "muted" }, "no rail checked this request"),
    el("h2", {}, "Shadow answers"),
    v.shadows.length ? table(["target", "answer", "names agree", "arguments agree"], v.shadows.map((s) => [
      `${s.target || ""} ${s.adapter || ""}`,
      el("div", {}, messages(s.response && s.response.choices ? s.response.choices.map((c) => c.message || {}) : [])),
      s.tool_name_agreement === null ? "–" : pill(s.tool_name_agreement ? "yes" : "no", s.tool_name_agreement ? "good" : "bad"),
      s.tool_args_agreement === null ? "–" : pill(s.tool_args_agreement ? "yes" : "no", s.tool_args_agreement ? "good" : "bad"),
    ])) : el("p", { class: "muted" }, "none"),
    el("h2", {}, "Feedback"),
    x.feedback.length ? table(["time", "metric", "value", "comment", "from"], x.feedback.map((f) => [fmt.time(f.ts_ms), f.metric || (f.demonstration ? "demonstration" : "comment"), f.value === null ? "" : String(f.value), f.comment || "", f.key_name])) : el("p", { class: "muted" }, "none"));
}

// ---- flywheel runs -------------------------------------------------------------------------

async function runsPage(parts) {
  if (parts[0]) return runPage(parts[0]);
  const runs = (await api("/v1/flywheel/runs?limit=200")).data;
  const byRoute = {};
  for (const r of runs) (byRoute[r.route] = byRoute[r.route] || []).push(r);
  app.replaceChildren(el("h1", {}, "Flywheel runs"),
    Object.keys(byRoute).length ? null : el("p", { class: "muted" }, "No run yet."),
    Object.entries(byRoute).map(([route, list]) => el("section", { class: "card" }, el("h2", {}, "Route ", route),
      el("div", { class: "timeline" }, table(["started", "trigger", "status", "stage", "decision"], list.map((r) => [
        link(`/ui/runs/${encodeURIComponent(r.id)}`, fmt.time(r.created_ms)),
        `${r.trigger.kind}${r.trigger.signal ? " (" + r.trigger.signal + ")" : ""}`,
        pill(r.status, r.status === "completed" ? "good" : r.status === "failed" ? "bad" : "warn"),
        r.stage,
        r.decision ? el("span", {}, r.decision.promote ? pill("promote", "good") : pill("no", ""), " ", r.decision.reason || "") : "–",
    ]))))));
}

/** A table of `{name: count}`, or "none". */
function counts(what, map) {
  const rows = Object.entries(map || {});
  return rows.length ? table([what, { label: "records", num: true }], rows.map(([k, n]) => [k, fmt.num(n)])) : el("p", { class: "muted" }, "none");
}

async function runPage(id) {
  const r = await api(`/v1/flywheel/runs/${encodeURIComponent(id)}`);
  const d = r.details || {};
  const c = d.curation || {};
  const dec = r.decision || {};
  const out = [el("h1", {}, "Run ", r.id), el("p", {}, link("/ui/runs", "← runs"), " · route ", r.route, " · ", pill(r.status), " · trigger ", r.trigger.kind, r.trigger.reason ? ": " + (typeof r.trigger.reason === "string" ? r.trigger.reason : JSON.stringify(r.trigger.reason)) : "")];
  out.push(el("section", { class: "card" }, el("h2", {}, "Curation"),
    el("div", { class: "tiles" }, tile("scanned", fmt.num(c.scanned)), tile("kept", fmt.num(c.kept))),
    el("h3", {}, "kept, by source"), counts("source", c.sources),
    el("h3", {}, "left out, by reason"), counts("reason", c.skipped)));
  const training = el("section", { class: "card" }, el("h2", {}, "Training"), d.training ? el("div", { class: "tiles" },
    tile("epochs", fmt.num(d.training.epochs_completed)), tile("tokens / s", fmt.num(d.training.tokens_per_sec, 0)), tile("time", fmt.num(d.training.elapsed_time, 0) + " s")) : el("p", { class: "muted" }, "not trained yet"));
  out.push(training);
  if (d.job_id) {
    try {
      const job = await api(`/v1/customization/jobs/${encodeURIComponent(d.job_id)}/status`);
      const m = job.metrics || {};
      const train = m.train_loss || [];
      const val = (m.val_loss || []).filter((p) => p && p.value !== null && p.value !== undefined);
      training.append(el("div", { class: "charts" },
        chart("training loss per step", train.map((p) => p.step), [{ label: "train loss", values: train.map((p) => p.value) }], [], { steps: true }),
        chart("validation loss per epoch", val.map((p) => p.epoch + 1), [{ label: "val loss", values: val.map((p) => p.value) }], [], { steps: true })));
    } catch (e) {
      training.append(errorBox(e));
    }
  }
  out.push(evaluationSection(r));
  out.push(el("section", { class: "card" }, el("h2", {}, "Decision"),
    el("p", {}, dec.promote ? pill("promote", "good") : pill("not promoted", "bad"), " ", dec.reason || ""),
    table(["check", { label: "value", num: true }, { label: "limit", num: true }, "passed", "detail"], (dec.checks || []).map((k) => [k.name, fmt.num(k.value, 3), fmt.num(k.limit, 3), k.passed ? pill("yes", "good") : pill("no", "bad"), k.detail]))));
  app.replaceChildren(...out);
}

// The candidate against the champion (or the teacher): each metric, the deciding metric's paired
// 95% interval, and the per-tool scores.
function evaluationSection(r) {
  const ev = (r.details || {}).evaluation || {};
  const dec = r.decision || {};
  const cs = (ev.candidate || {}).scores || {};
  const ch = (ev.champion || {}).scores || {};
  const metrics = Object.keys(cs).filter((k) => typeof cs[k] === "number");
  const cmp = dec.comparison || {};
  return el("section", { class: "card evaluation" }, el("h2", {}, "Evaluation"),
    el("p", { class: "muted" }, `${fmt.num(ev.items)} held-out items; candidate ${(ev.candidate || {}).target || ""} against ${dec.against || "–"} ${(ev.champion || {}).target || ""}`),
    table(["metric", { label: "candidate", num: true }, { label: dec.against === "teacher" ? "teacher (ground truth)" : "champion", num: true }],
      metrics.map((k) => [k, fmt.num(cs[k], 3), typeof ch[k] === "number" ? fmt.num(ch[k], 3) : "–"])),
    dec.metric ? el("p", {}, `${dec.metric}: candidate ${fmt.num(cmp.a, 3)} vs ${fmt.num(cmp.b, 3)}, difference ${fmt.num(cmp.difference, 3)} (paired 95% interval ${fmt.num(cmp.ci_low, 3)} to ${fmt.num(cmp.ci_high, 3)}, ${fmt.num(cmp.items)} items)`) : null,
    el("h3", {}, "per tool"), table(["tool", { label: "items", num: true }, { label: "incumbent", num: true }, { label: "candidate", num: true }],
      Object.entries(dec.per_tool || {}).map(([t, [n, inc, cand]]) => [t, fmt.num(n), fmt.num(inc, 3), fmt.num(cand, 3)])));
}

// ---- rollouts ------------------------------------------------------------------------------

async function rolloutsPage() {
  const body = el("div");
  app.replaceChildren(el("h1", {}, "Rollouts"), body);
  const draw = async () => {
    const [routes, ov] = await Promise.all([api("/v1/flywheel/routes"), api("/v1/dashboard/overview?window=1h")]);
    // A candidate held for approval is shown with the evaluation it passed.
    const held = await Promise.all(routes.data.map((s) => (s.stage === "awaiting_approval" && s.run_id
      ? api(`/v1/flywheel/runs/${encodeURIComponent(s.run_id)}`).catch(() => null) : null)));
    charts.forEach((c) => c.destroy());
    charts = [];
    body.replaceChildren(...(routes.data.length ? routes.data.map((s, i) => rolloutCard(s, ov, held[i])) : [el("p", { class: "muted" }, "No route has a flywheel.")]));
  };
  await draw();
  live(draw, 5);
}

async function act(route, action) {
  const reason = window.prompt(`Reason to ${action} route '${route}':`, "");
  if (reason === null) return;
  try {
    await api(`/v1/flywheel/routes/${encodeURIComponent(route)}/${action}`, { method: "POST", body: { reason } });
    render();
  } catch (e) {
    app.prepend(errorBox(e));
  }
}

function rolloutCard(s, ov, heldRun) {
  const plan = s.plan || {};
  const live = s.live || {};
  const o = ov.routes.find((r) => r.route === s.route);
  const range = [ov.since_ms, ov.until_ms];
  // The candidate's own answers (its shadow copies, or the canary arm's requests) give its error
  // rates; agreement is measured on the mirrored answers, which are logged as shadow rows.
  const arm = s.stage === "shadow" ? "shadow" : "canary";
  const armSeries = (name) => (o && o.arms[name] ? o.arms[name].series : []);
  const series = armSeries(arm);
  const mirrored = armSeries("shadow").filter((p) => p.compared > 0);
  const agreeKey = plan.agreement_on === "arguments" ? "args_agreement" : "name_agreement";
  const minAgreement = s.stage === "shadow" ? plan.shadow_min_agreement : plan.canary_min_agreement;
  const buttons = [];
  if (s.stage === "awaiting_approval") {
    buttons.push(el("button", { class: "primary", "data-action": "approve", onclick: () => act(s.route, "approve") }, "Approve"));
    buttons.push(el("button", { class: "danger", "data-action": "reject", onclick: () => act(s.route, "reject") }, "Reject"));
  }
  if (s.stage === "shadow" || s.stage === "canary") buttons.push(el("button", { "data-action": "promote", onclick: () => act(s.route, "promote") }, "Promote"));
  buttons.push(el("button", { class: "danger", "data-action": "rollback", onclick: () => act(s.route, "rollback") }, "Roll back"));
  buttons.push(s.paused
    ? el("button", { "data-action": "resume", onclick: () => act(s.route, "resume") }, "Resume")
    : el("button", { "data-action": "pause", onclick: () => act(s.route, "pause") }, "Pause"));
  return el("section", { class: "card", "data-route": s.route },
    el("h2", {}, "Route ", s.route, " ", pill(s.stage, s.stage === "idle" ? "" : "warn"), s.paused ? pill("paused", "bad") : null),
    el("div", { class: "tiles" },
      tile("champion", fmt.target(s.champion)),
      tile("candidate", fmt.target(s.candidate)),
      tile("since", fmt.time(s.stage_started_ms)),
      live.requests !== undefined ? tile("stage requests", fmt.num(live.requests)) : null),
    s.stage === "awaiting_approval" && s.run_id ? el("p", {}, "Awaiting approval after ", link(`/ui/runs/${encodeURIComponent(s.run_id)}`, `run ${s.run_id}`), ":") : null,
    heldRun ? evaluationSection(heldRun) : null,
    el("div", { class: "actions" }, buttons),
    s.stage === "shadow" || s.stage === "canary" ? el("div", { class: "charts" },
      chart(`${arm}: agreement with the champion`, mirrored.map((p) => p.t_ms), [{ label: "agreement", values: mirrored.map((p) => p[agreeKey]) }], [{ label: "guard", value: minAgreement }], { range }),
      chart(`${arm}: error and parse-failure rates`, series.map((p) => p.t_ms), [{ label: "errors", values: series.map((p) => p.error_rate) }, { label: "parse failures", values: series.map((p) => p.parse_failure_rate) }], s.stage === "canary" ? [{ label: "error guard", value: plan.canary_max_error_rate }, { label: "parse guard", value: plan.canary_max_parse_failure_rate }] : [], { range }),
      chart(`${arm}: rails block rate`, series.map((p) => p.t_ms), [{ label: "blocked", values: series.map((p) => p.block_rate) }], s.stage === "canary" ? [{ label: "guard", value: plan.canary_max_block_rate }] : [], { range })) : null,
    el("h3", {}, "transitions"),
    table(["time", "action", "from → to", "reason"], (s.events || []).slice().reverse().slice(0, 20).map((e) => [fmt.time(e.at_ms), e.action, `${e.from} → ${e.to}`, e.reason])));
}

// ---- adapters ------------------------------------------------------------------------------

async function adaptersPage() {
  const v = await api("/v1/adapters");
  const name = el("input", { name: "name", placeholder: "namespace/name" });
  const path = el("input", { name: "path", placeholder: "adapter directory", size: 40 });
  const msg = el("div");
  app.replaceChildren(el("h1", {}, "Adapters"), msg,
    v.data.length ? table(["name", "base", { label: "rank", num: true }, { label: "alpha", num: true }, "modules", { label: "generation", num: true }, { label: "bytes", num: true }, { label: "requests served", num: true }, { label: "idle", num: true }, ""], v.data.map((a) => [
      a.id, a.base_model || "", fmt.num(a.rank), fmt.num(a.alpha), (a.target_modules || []).join(", "), fmt.num(a.generation), fmt.num(a.bytes), fmt.num(a.requests_served), fmt.num(a.idle_s, 0) + " s",
      el("button", { class: "danger", "data-action": "unload", onclick: async () => {
        if (!window.confirm(`Unload ${a.id}?`)) return;
        try { await api(`/v1/adapters/${a.id}`, { method: "DELETE" }); render(); } catch (e) { msg.replaceChildren(errorBox(e)); }
      } }, "Unload")])) : el("p", { class: "muted" }, "No adapter loaded."),
    el("h2", {}, "Load an adapter"),
    el("form", { class: "filters", onsubmit: async (ev) => {
      ev.preventDefault();
      try { await api("/v1/adapters", { method: "POST", body: { name: name.value, path: path.value } }); render(); } catch (e) { msg.replaceChildren(errorBox(e)); }
    } }, el("label", {}, "name", name), el("label", {}, "path", path), el("button", { class: "primary", type: "submit" }, "Load")));
}

// ---- rails ---------------------------------------------------------------------------------

async function railsPage(_, params) {
  const win = params.get("window") || "1h";
  const body = el("div");
  app.replaceChildren(el("h1", {}, "Rails"), el("div", { class: "windows" }, "Window: ", WINDOWS.map((w) => el("a", { class: w === win ? "current" : null, href: `/ui/rails?window=${w}`, onclick: (ev) => { ev.preventDefault(); go(`/ui/rails?window=${w}`); } }, w))), body);
  const draw = async () => {
    const v = await api(`/v1/dashboard/overview?window=${encodeURIComponent(win)}`);
    charts.forEach((c) => c.destroy());
    charts = [];
    body.replaceChildren(...v.routes.map((r) => railsCard(r, [v.since_ms, v.until_ms])));
  };
  await draw();
  live(draw, 10);
}

function railsCard(r, range) {
  const t = r.totals;
  const rails = t.rails;
  const times = r.series.map((p) => p.t_ms);
  const categories = Object.keys(rails.blocked_by_category);
  const flows = Object.keys(rails.flow_latency_ms);
  const byCategory = categories.length
    ? categories.map((c) => ({ label: c, values: r.series.map((p) => p.rails.blocked_by_category[c] || 0) }))
    : [{ label: "blocked", values: r.series.map((p) => p.blocked) }];
  return el("section", { class: "card", "data-route": r.route }, el("h2", {}, "Route ", r.route),
    el("div", { class: "tiles" },
      tile("requests", fmt.num(t.requests)), tile("checked by rails", fmt.num(rails.checked)),
      tile("blocked", fmt.num(t.blocked)), tile("block rate", fmt.pct(t.block_rate)),
      tile("verdict cache hits", `${fmt.num(rails.cached)} (${fmt.pct(rails.cache_hit_rate)})`)),
    el("div", { class: "charts" },
      chart("blocks by category", times, byCategory, [], { range }),
      flows.length
        ? chart("rail latency p50 (ms)", times, flows.map((f) => ({ label: f, values: r.series.map((p) => (p.rails.flow_latency_ms[f] || {}).p50) })), [], { range })
        : chart("requests checked", times, [{ label: "checked", values: r.series.map((p) => p.rails.checked) }, { label: "requests", values: r.series.map((p) => p.requests) }], [], { range })),
    categories.length ? table(["category", { label: "blocked", num: true }], categories.map((c) => [c, fmt.num(rails.blocked_by_category[c])])) : null,
    flows.length ? table(["rail", { label: "p50", num: true }, { label: "p95", num: true }], flows.map((f) => [f, fmt.ms(rails.flow_latency_ms[f].p50), fmt.ms(rails.flow_latency_ms[f].p95)])) : null);
}

// ---- jobs ----------------------------------------------------------------------------------

async function jobsPage() {
  const body = el("div");
  app.replaceChildren(el("h1", {}, "Jobs"), body);
  const bar = (p) => el("span", {}, el("span", { class: "progress" }, el("div", { style: `width:${Math.max(0, Math.min(100, p || 0))}%` })), " ", fmt.num(p || 0, 0), "%");
  const draw = async () => {
    const [cust, evals] = await Promise.all([api("/v1/customization/jobs"), api("/v1/evaluation/jobs")]);
    body.replaceChildren(
      el("h2", {}, "Customization"),
      cust.data.length ? table(["job", "adapter", "status", "progress", "created"], cust.data.map((j) => [j.id, j.output_model || "", pill(j.status, j.status === "completed" ? "good" : j.status === "failed" ? "bad" : "warn"), bar((j.status_details || {}).percentage_done), j.created_at || ""])) : el("p", { class: "muted" }, "none"),
      el("h2", {}, "Evaluation"),
      evals.data.length ? table(["job", "target", "status", "progress", "created"], evals.data.map((j) => [j.id, JSON.stringify(j.target || "").slice(0, 80), pill(j.status, j.status === "completed" ? "good" : j.status === "failed" ? "bad" : "warn"), bar((j.status_details || {}).progress), j.created_at || ""])) : el("p", { class: "muted" }, "none"));
  };
  await draw();
  live(draw, 3);
}

// ---- start ---------------------------------------------------------------------------------

document.querySelectorAll("header a").forEach((a) => a.addEventListener("click", (ev) => {
  if (ev.button !== 0 || ev.metaKey || ev.ctrlKey) return;
  ev.preventDefault();
  go(a.getAttribute("href"));
}));
render();
