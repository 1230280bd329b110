"""The status page served at `GET /`: one HTML file, no build step, no outside resources.

Progress and jobs are pushed once a second by `GET /progress/stream` (server-sent events),
read with `fetch()` and a stream reader rather than `EventSource`: EventSource cannot send an
`Authorization` header, and off loopback the stream needs the bearer token like every other
request; a token in the URL instead would land in access logs, proxies and the browser's
history, and a cookie would open the API to cross-site requests. When the stream fails (an old
proxy that buffers it), the page polls `/progress` and `/jobs` every second instead. It renders
with DOM calls (never innerHTML), so names from an exchange cannot inject markup. When a request
is refused for want of a bearer token (admin bound off loopback), the page asks for the token
once, however many requests were refused at the same time, and keeps it for the browser tab
(sessionStorage).

In live mode (`GET /connectors` answers) it also manages: connectors enabled and disabled, jobs
added (with a schedule) and deleted, backfills started from dates; and it shows each job's
schedule and runs so far.
"""

STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tda-collector jobs</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:14px;align-items:center}
header h1{font-size:17px;margin:0;flex:1}
main{padding:14px 18px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px;margin:0 0 14px}
h2{font-size:14px;margin:0 0 8px;color:#4a5468}
.bar{background:#e6e9ee;border-radius:4px;height:10px;overflow:hidden;min-width:90px}
.bar>i{display:block;height:100%;background:#2f7de1}
#total .bar{height:18px}
.stats{display:flex;flex-wrap:wrap;gap:18px;margin-top:8px}
.stats b{font-size:17px;display:block}
.chip{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.PENDING{background:#e6e9ee}.RUNNING{background:#d5e6fb;color:#174b8f}
.PAUSED{background:#fdeecb;color:#7a5200}.COMPLETED{background:#d6f0dc;color:#1d6b32}
.FAILED{background:#f9d7d7;color:#8f1d1d}.CANCELLED{background:#e9e0f5;color:#51307a}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3;vertical-align:middle}
th{font-size:12px;color:#667085;font-weight:600}
td.err{color:#8f1d1d;max-width:340px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td.id,td.act{white-space:nowrap}
button{font:inherit;font-size:12px;padding:2px 8px;margin-right:3px;cursor:pointer}
header button{font-size:13px}
#msg{color:#ffd27a}
form{margin:8px 0}form input,form select{font:inherit;font-size:13px}
</style></head>
<body>
<header><h1>tda-collector <span id="mode"></span></h1><span id="msg"></span>
<button id="pause-all">Pause all</button><button id="resume-all">Resume all</button>
<span id="updated"></span></header>
<main>
<section id="total"><h2>Progress</h2><div class="bar"><i id="total-bar"></i></div>
<div class="stats" id="stats"></div></section>
<section><h2>Exchange budgets</h2><table id="budgets"><thead><tr><th>exchange</th>
<th>requests/s</th><th>limit/s</th><th>budget/s</th><th>budget used</th><th>jobs done</th>
<th>paused</th></tr></thead><tbody></tbody></table></section>
<section id="service" hidden><h2>Connectors</h2><table id="connectors"><thead><tr>
<th>connector</th><th>enabled</th><th>symbols</th><th>timeframes</th><th>rate limit</th><th></th>
</tr></thead><tbody></tbody></table>
<form id="add-job">Add a job: <select id="aj-exchange"></select>
<input id="aj-symbol" placeholder="BTC/USDT" size="12" required>
<input id="aj-timeframe" value="1m" size="4" required>
<select id="aj-mode"><option value="timeframe">each close</option>
<option value="cron">cron</option></select>
<input id="aj-cron" placeholder="*/5 * * * *" size="12"> <button id="aj-add">add job</button></form>
<form id="backfill">Backfill <input id="bf-job" placeholder="job id" size="34" required>
from <input type="date" id="bf-start" required> to <input type="date" id="bf-end">
<button id="bf-go">start backfill</button></form></section>
<section><h2>Jobs <span id="shown"></span></h2>
<p><select id="status"><option value="">every status</option></select>
<input id="q" placeholder="filter by id, e.g. BTC" size="24"></p>
<table id="jobs"><thead><tr><th>job</th><th>status</th><th>covered</th><th>candles</th>
<th>last run</th><th>next run</th><th>last error</th><th>schedule</th><th>runs</th><th></th>
</tr></thead><tbody></tbody>
</table></section>
</main>
<script>
"use strict";
const STATUSES = ["PENDING", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED"];
const ACTIONS = {pause: ["PENDING", "RUNNING"], resume: ["PAUSED"],
                 cancel: ["PENDING", "RUNNING", "PAUSED"]};
const $ = (id) => document.getElementById(id);
const num = (n) => n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US");
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function bar(fraction) {
  const b = el("div", undefined, "bar"), i = el("i");
  i.style.width = (100 * (fraction || 0)).toFixed(1) + "%";
  b.appendChild(i);
  return b;
}
function eta(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return h + ":" + String(m).padStart(2, "0") + ":" + String(r).padStart(2, "0");
}
function when(ms) {
  if (!ms) return "-";
  const d = Math.round((ms - Date.now()) / 1000);
  return Math.abs(d) < 1 ? "now" : d > 0 ? "in " + d + "s" : -d + "s ago";
}
function pct(f) { return f === null || f === undefined ? "-" : (100 * f).toFixed(1) + "%"; }
let service = false;  // the live service's endpoints answer: connectors, add, delete, backfill
function withToken(init) {
  const token = sessionStorage.getItem("tda-token");
  if (token) init.headers.Authorization = "Bearer " + token;
  return init;
}
// Off loopback every request needs the admin token: asked for once, kept for the tab; a
// wrong one is asked for again, and a declined prompt is not repeated. Requests refused while
// the prompt showed (prompt() blocks the page) go again with the token it gave.
let declined = false;
async function send(method, path, body, signal) {
  const init = withToken({method, headers: {}, signal});
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const sent = init.headers.Authorization;
  if (r.status === 401 || (r.status === 403 && sent !== undefined)) {
    const kept = sessionStorage.getItem("tda-token");
    if (kept && "Bearer " + kept !== sent) return send(method, path, body, signal);
    if (!declined) {
      sessionStorage.removeItem("tda-token");
      const t = prompt("Admin token");
      if (t) { sessionStorage.setItem("tda-token", t); return send(method, path, body, signal); }
      declined = true;
    }
  }
  return r;
}
async function api(method, path, body) {
  const r = await send(method, path, body);
  const answer = await r.json().catch(() => ({}));
  $("msg").textContent = r.ok ? "" : (answer.error || "HTTP " + r.status);
  refresh();
  return r.ok ? answer : null;
}
const post = (path) => api("POST", path);
async function get(path) { return (await send("GET", path)).json(); }
function stat(label, value) {
  const d = el("div"); d.appendChild(el("b", value)); d.appendChild(el("span", label));
  return d;
}
function renderProgress(p) {
  $("mode").textContent = "· " + p.mode + (p.running ? "" : " · finished");
  $("total-bar").style.width = (100 * (p.covered === null ? p.jobs.done / Math.max(1,
    p.jobs.total) : p.covered)).toFixed(1) + "%";
  const stats = [stat("jobs done", num(p.jobs.done) + " / " + num(p.jobs.total)),
    stat("covered", pct(p.covered)), stat("candles stored", num(p.candles)),
    stat("candles/s", num(p.rate.candles_per_s === null ? null : Math.round(p.rate.candles_per_s))),
    stat("jobs/s", num(p.rate.jobs_per_s)),
    stat("ETA", eta(p.eta_s))];
  for (const s of STATUSES) {
    const d = el("div"); d.appendChild(el("b", num(p.jobs.by_status[s])));
    d.appendChild(el("span", s, "chip " + s)); stats.push(d);
  }
  $("stats").replaceChildren(...stats);
  const paused = new Map((p.paused || []).map((x) => [x.exchange, x]));
  $("budgets").tBodies[0].replaceChildren(...p.exchanges.map((x) => {
    const tr = el("tr");
    tr.appendChild(el("td", x.id));
    tr.appendChild(el("td", num(x.requests_per_s)));
    tr.appendChild(el("td", num(x.limit_per_s)));
    tr.appendChild(el("td", num(x.budget_per_s)));
    const used = el("td"); used.appendChild(bar(x.budget_used));
    used.appendChild(el("span", pct(x.budget_used))); tr.appendChild(used);
    tr.appendChild(el("td", num(x.done) + " / " + num(x.jobs)));
    const pause = paused.get(x.id);  // a Retry-After or ban past retry.retry_after_max_seconds
    tr.appendChild(el("td", pause ? "until " + pause.resume_at + " (HTTP " + pause.status + ")"
      : "", "err"));
    return tr;
  }));
  $("updated").textContent = new Date(p.updated_ms).toLocaleTimeString();
}
function renderJobs(list) {
  $("shown").textContent = "(" + list.jobs.length + " of " + list.total + " shown)";
  $("jobs").tBodies[0].replaceChildren(...list.jobs.map((j) => {
    const tr = el("tr"); tr.dataset.id = j.id;
    tr.appendChild(el("td", j.id, "id"));
    const st = el("td"); st.appendChild(el("span", j.status, "chip " + j.status));
    tr.appendChild(st);
    const cov = el("td"); cov.appendChild(bar(j.covered === null ? 0 : j.covered));
    cov.appendChild(el("span", pct(j.covered))); tr.appendChild(cov);
    tr.appendChild(el("td", num(j.rows)));
    tr.appendChild(el("td", when(j.last_run_ms)));
    tr.appendChild(el("td", when(j.next_run_ms)));
    const err = el("td", j.last_error || "", "err"); err.title = j.last_error || "";
    tr.appendChild(err);
    const sched = j.schedule ? (j.schedule.mode === "cron" ? "cron " + j.schedule.cron
      : "each close") : "";
    tr.appendChild(el("td", sched));
    tr.appendChild(el("td", num(j.runs_total)));
    const path = "/jobs/" + encodeURIComponent(j.id);
    const act = el("td", undefined, "act");
    for (const [action, from] of Object.entries(ACTIONS)) {
      const b = el("button", action); b.dataset.action = action;
      b.disabled = !from.includes(j.status);
      b.onclick = () => post(path + "/" + action);
      act.appendChild(b);
    }
    if (service && j.mode === "live") {
      const b = el("button", "backfill…"); b.dataset.action = "backfill";
      b.onclick = () => { $("bf-job").value = j.id; $("bf-start").focus(); };
      act.appendChild(b);
    }
    if (service) {
      const b = el("button", "delete"); b.dataset.action = "delete";
      b.onclick = () => api("DELETE", path);
      act.appendChild(b);
    }
    tr.appendChild(act);
    return tr;
  }));
}
function jobParams() {
  const params = new URLSearchParams({limit: "300"});
  if ($("status").value) params.set("status", $("status").value);
  if ($("q").value) params.set("q", $("q").value);
  return params;
}
async function refresh() {
  try {
    const [p, jobs] = await Promise.all([get("/progress"), get("/jobs?" + jobParams())]);
    renderProgress(p);
    renderJobs(jobs);
  } catch (e) {
    $("msg").textContent = "collector unreachable";
  }
}
function renderConnectors(list) {
  const options = [];
  $("connectors").tBodies[0].replaceChildren(...list.connectors.map((c) => {
    const tr = el("tr"); tr.dataset.id = c.id;
    tr.appendChild(el("td", c.id));
    tr.appendChild(el("td", c.enabled ? "enabled" : "disabled",
      "chip " + (c.enabled ? "RUNNING" : "PAUSED")));
    tr.appendChild(el("td", (c.symbols || []).join(", ")));
    tr.appendChild(el("td", (c.timeframes || []).join(", ")));
    const r = c.rate_limit_state;
    tr.appendChild(el("td", r ? r.usage + " / " + r.limit + " per " + r.period_ms + " ms" : "-"));
    const act = el("td", undefined, "act");
    const b = el("button", c.enabled ? "disable" : "enable");
    b.dataset.action = c.enabled ? "disable" : "enable";
    b.onclick = () => api("POST", "/connectors/" + encodeURIComponent(c.id) + "/" +
      b.dataset.action).then(refreshConnectors);
    act.appendChild(b); tr.appendChild(act);
    options.push(el("option", c.id));
    return tr;
  }));
  const chosen = $("aj-exchange").value;
  $("aj-exchange").replaceChildren(...options);
  if (chosen) $("aj-exchange").value = chosen;
}
async function refreshConnectors() {
  const r = await send("GET", "/connectors").catch(() => null);
  service = r !== null && r.ok;
  $("service").hidden = !service;
  if (service) renderConnectors(await r.json());
}
function renderEvent(block) {  // one server-sent event: its data lines are one JSON body
  const data = block.split("\\n").filter((l) => l.startsWith("data:"))
    .map((l) => l.slice(5).trimStart()).join("\\n");
  if (!data) return;
  const body = JSON.parse(data);
  renderProgress(body.progress);
  renderJobs(body.jobs);
}
let following = null, polling = null;
// Pushed once a second, the token in a header; polled when the stream fails.
async function follow() {
  if (following) following.abort();
  if (polling) return;
  const ctrl = following = new AbortController();
  try {
    const r = await send("GET", "/progress/stream?" + jobParams(), undefined, ctrl.signal);
    if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) throw new Error("the stream ended");
      buffer += value;  // the server separates events with LF only
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        renderEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (e) {
    if (ctrl.signal.aborted) return;  // a newer follow() (the filter changed) took over
    following = null;
    polling = setInterval(refresh, 1000);
  }
}
function instant(value) { return value ? value + "T00:00:00Z" : undefined; }
$("add-job").onsubmit = (e) => {
  e.preventDefault();
  const schedule = $("aj-mode").value === "cron" ? {mode: "cron", cron: $("aj-cron").value}
    : {mode: "timeframe"};
  api("POST", "/jobs", {exchange: $("aj-exchange").value, symbol: $("aj-symbol").value.trim(),
    timeframe: $("aj-timeframe").value.trim(), schedule});
};
$("backfill").onsubmit = (e) => {
  e.preventDefault();
  api("POST", "/jobs/" + encodeURIComponent($("bf-job").value.trim()) + "/backfill",
    {start: instant($("bf-start").value), end: instant($("bf-end").value)});
};
for (const s of STATUSES) $("status").appendChild(el("option", s));
$("pause-all").onclick = () => post("/pause");
$("resume-all").onclick = () => post("/resume");
$("status").onchange = () => { refresh(); follow(); };
$("q").oninput = () => { refresh(); follow(); };
refreshConnectors().then(refresh);
follow();
setInterval(refreshConnectors, 2000);
</script>
</body></html>
"""
