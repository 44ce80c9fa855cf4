// The sweep page: a table, parallel coordinates, curves and a timeline, drawn from one JSON
// object (sweeprun/report/data.py). Plotly is inlined before this script; nothing is fetched
// from anywhere but, on the live page, this page's own /data.json.
"use strict";

const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];
const OUTCOMES = {done: "#2ca02c", interrupted: "#ff7f0e", lost: "#d62728", "lost-limit": "#d62728",
                  failed: "#8b0000", "rolled-back": "#9467bd", diverged: "#4b0082", oom: "#e377c2",
                  running: "#1f77b4"};
const TIMELINE_RUNS = 200;
// No button that sends anything anywhere (Chart Studio's links): the page stays on this machine.
const PLOT_CONFIG = {displaylogo: false, responsive: true, showLink: false, showSendToCloud: false,
                     showEditInChartStudio: false, modeBarButtonsToRemove: ["sendDataToCloud"]};

let DATA = JSON.parse(document.getElementById("sweep-data").textContent);
const LIVE = document.body.dataset.live === "1";
const state = {metric: null, higher: null, topk: 0, by: null, logMetric: false};

function el(id) { return document.getElementById(id); }
// Plotly reads a subset of HTML in names, labels and tick text (links among it): a parameter
// value or a metric name is shown as text, never as markup.
function esc(text) {
  return String(text).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function fmt(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const a = Math.abs(value);
    return (a !== 0 && (a < 1e-3 || a >= 1e5)) ? value.toExponential(3) : value.toPrecision(4).replace(/\.?0+$/, "");
  }
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}
function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

function best(run) {
  const b = run.best[state.metric];
  return b ? b.value : null;
}

// The runs ordered best first by the chosen metric (runs without it last, in grid order).
function ranked() {
  const sign = state.higher ? -1 : 1;
  return DATA.runs.map((run, i) => [run, i]).sort((a, b) => {
    const x = best(a[0]), y = best(b[0]);
    if (x === null && y === null) return a[1] - b[1];
    if (x === null) return 1;
    if (y === null) return -1;
    return sign * (x - y) || a[1] - b[1];
  }).map(p => p[0]);
}

function shown() {
  const withMetric = ranked().filter(r => best(r) !== null);
  return state.topk > 0 ? withMetric.slice(0, state.topk) : withMetric;
}

function setupControls() {
  const metric = el("metric"), by = el("by");
  const previous = state.metric;
  metric.innerHTML = DATA.metrics.map(m => `<option>${esc(m)}</option>`).join("");
  if (!DATA.metrics.includes(previous)) {
    state.metric = DATA.metrics[0] || null;
    state.higher = state.metric ? DATA.higher_is_better[state.metric] : false;
  }
  metric.value = state.metric || "";
  el("goal").value = state.higher ? "max" : "min";
  const byPrevious = state.by;
  by.innerHTML = `<option value="">(each run)</option>` + DATA.params.map(p => `<option>${esc(p)}</option>`).join("");
  state.by = DATA.params.includes(byPrevious) ? byPrevious : (byPrevious === null ? (DATA.params[0] || "") : "");
  by.value = state.by;
}

function drawSummary() {
  const counts = {};
  for (const run of DATA.runs) counts[run.state] = (counts[run.state] || 0) + 1;
  el("summary").innerHTML = Object.keys(counts).sort().map(
    s => `<span class="chip state-${esc(s)}" data-state="${esc(s)}">${esc(s)} <b>${counts[s]}</b></span>`).join("") +
    `<span class="chip">runs <b>${DATA.runs.length}</b></span>`;
  const when = new Date(DATA.generated_at * 1000);
  el("generated").textContent = (LIVE ? "updated " : "written ") + when.toLocaleString();
}

function drawTable() {
  const params = DATA.params, m = state.metric;
  const head = ["run", ...params, "state", "attempts", "resumes", "rollbacks", "step",
                `best ${m || ""}`, `last ${m || ""}`, "checkpoint age", "held by"];
  const rows = ranked().map(run => {
    const b = run.best[m];
    const cells = [
      ["run", `<code>${esc(run.id)}</code>`],
      ...params.map(p => ["param", esc(fmt(run.params[p]))]),
      ["state", `<span class="state-${esc(run.state)}">${esc(run.state)}</span>` + (run.approximate ? " ≈" : "")],
      ["attempts", String(run.attempts)],
      ["resumes", String(run.resumes)],
      ["rollbacks", run.rollbacks ? "↺" + run.rollbacks : ""],
      ["step", fmt(run.step)],
      ["best", b ? `${esc(fmt(b.value))} <small>@${esc(fmt(b.step))}</small>` : ""],
      ["last", esc(fmt(run.last[m]))],
      ["age", esc(age(run.checkpoint_age_s))],
      ["worker", esc(run.worker || "")],
    ];
    return `<tr data-run="${esc(run.id)}" data-state="${esc(run.state)}">` +
      cells.map(([k, v]) => `<td data-col="${k}">${v}</td>`).join("") + "</tr>";
  });
  el("runs").innerHTML = `<thead><tr>${head.map(h => `<th>${esc(h)}</th>`).join("")}</tr></thead>` +
    `<tbody>${rows.join("")}</tbody>`;
}

// A parameter's axis: numbers as they are (log10 when they span two decades or more and are
// all positive), anything else as the index of its value.
function axis(name, runs) {
  const raw = runs.map(r => r.params[name]);
  const numeric = raw.every(v => typeof v === "number" && isFinite(v));
  if (numeric) {
    const lo = Math.min(...raw), hi = Math.max(...raw);
    if (lo > 0 && hi / lo >= 100) {
      const decades = [];
      for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) decades.push(e);
      return {label: esc(name) + " (log)", values: raw.map(Math.log10), tickvals: decades,
              ticktext: decades.map(e => fmt(Math.pow(10, e)))};
    }
    return {label: esc(name), values: raw};
  }
  const distinct = [...new Set(raw.map(v => fmt(v)))].sort();
  return {label: esc(name), values: raw.map(v => distinct.indexOf(fmt(v))),
          tickvals: distinct.map((_, i) => i), ticktext: distinct.map(esc)};
}

function drawParallel() {
  const runs = shown(), m = state.metric, box = el("parallel");
  if (!runs.length || !m) { Plotly.purge(box); box.textContent = "no run has logged a metric yet"; return; }
  box.textContent = "";
  const dims = DATA.params.map(p => axis(p, runs)).map(a => ({label: a.label, values: a.values,
    tickvals: a.tickvals, ticktext: a.ticktext}));
  let values = runs.map(best);
  const log = state.logMetric && values.every(v => v > 0);
  if (log) values = values.map(Math.log10);
  dims.push({label: (log ? "log10 " : "") + "best " + esc(m), values: values});
  Plotly.react(box, [{type: "parcoords", dimensions: dims,
    line: {color: values, colorscale: "Viridis", reversescale: !state.higher, showscale: true}}],
    {margin: {l: 60, r: 60, t: 50, b: 20}, height: 360, uirevision: "keep"}, PLOT_CONFIG);
}

function drawCurves() {
  const runs = shown(), m = state.metric, box = el("curves");
  if (!runs.length || !m) { Plotly.purge(box); box.textContent = "no curve yet"; return; }
  box.textContent = "";
  const groups = state.by ? [...new Set(runs.map(r => fmt(r.params[state.by])))].sort((a, b) =>
    (isNaN(a) || isNaN(b)) ? a.localeCompare(b) : Number(a) - Number(b)) : [];
  const legend = new Set();
  const drawn = runs.filter(r => DATA.curves[r.id] && DATA.curves[r.id][m]);
  const kind = drawn.length > 100 ? "scattergl" : "scatter";   // many curves: WebGL
  const traces = drawn.map((run, i) => {
    const [xs, ys] = DATA.curves[run.id][m];
    const group = state.by ? fmt(run.params[state.by]) : run.id;
    const colour = COLOURS[(state.by ? groups.indexOf(group) : i) % COLOURS.length];
    const first = !legend.has(group);
    legend.add(group);
    return {type: kind, mode: "lines", x: xs, y: ys,
            name: esc(state.by ? `${state.by}=${group}` : run.id), legendgroup: group, showlegend: first,
            line: {color: colour, width: 1.3}, opacity: 0.85,
            hovertemplate: `${esc(run.id)}<br>step %{x}<br>${esc(m)} %{y}<extra></extra>`};
  });
  Plotly.react(box, traces, {margin: {l: 60, r: 20, t: 30, b: 40}, height: 380, uirevision: "keep",
    xaxis: {title: {text: "step"}}, yaxis: {title: {text: esc(m)}, type: state.logMetric ? "log" : "linear"}},
    PLOT_CONFIG);
}

function drawTimeline() {
  const box = el("timeline");
  const withAttempts = DATA.runs.filter(r => r.timeline.length);
  const chosen = new Set(shown().map(r => r.id));
  let runs = withAttempts.filter(r => chosen.has(r.id) || r.state !== "done" || r.attempts > 1);
  if (runs.length < TIMELINE_RUNS) runs = withAttempts;
  runs = runs.slice(0, TIMELINE_RUNS);
  el("timeline-note").textContent = withAttempts.length > runs.length ?
    `${runs.length} of ${withAttempts.length} runs: the ones not done, restarted or among the best` : "";
  if (!runs.length) { Plotly.purge(box); box.textContent = "no attempt recorded in this machine's ledger"; return; }
  box.textContent = "";
  const byOutcome = {};
  for (const run of runs) {
    for (const a of run.timeline) {
      if (a.start === null) continue;
      const outcome = a.outcome || "unknown";
      const end = a.end === null ? DATA.generated_at : a.end;
      const t = byOutcome[outcome] = byOutcome[outcome] || {x: [], base: [], y: [], text: []};
      t.base.push(new Date(a.start * 1000).toISOString());
      t.x.push(Math.max(1, (end - a.start) * 1000));
      t.y.push(esc(run.id));
      t.text.push(`attempt ${a.attempt}: ${esc(outcome)}` + (a.worker ? ` on ${esc(a.worker)}` : "") +
                  (a.exit_code !== null && a.exit_code !== undefined ? ` (exit ${a.exit_code})` : ""));
    }
  }
  const traces = Object.keys(byOutcome).sort().map(o => ({type: "bar", orientation: "h", name: esc(o),
    x: byOutcome[o].x, base: byOutcome[o].base, y: byOutcome[o].y, text: byOutcome[o].text,
    hovertemplate: "%{y}<br>%{text}<extra></extra>", textposition: "none",
    marker: {color: OUTCOMES[o] || "#999"}}));
  Plotly.react(box, traces, {barmode: "overlay", margin: {l: 160, r: 20, t: 30, b: 40}, uirevision: "keep",
    height: Math.max(240, 22 * runs.length + 80), xaxis: {type: "date"},
    yaxis: {type: "category", automargin: true, autorange: "reversed"}}, PLOT_CONFIG);
}

function drawAll() {
  drawSummary();
  drawTable();
  drawParallel();
  drawCurves();
  drawTimeline();
  const cut = DATA.runs.filter(r => r.cut).length;
  el("notes").textContent = cut ? `${cut} run(s) logged more than a report reads: their curves start later` : "";
}

function wire() {
  el("metric").addEventListener("change", e => {
    state.metric = e.target.value;
    state.higher = DATA.higher_is_better[state.metric];
    el("goal").value = state.higher ? "max" : "min";
    drawAll();
  });
  el("goal").addEventListener("change", e => { state.higher = e.target.value === "max"; drawAll(); });
  el("topk").addEventListener("change", e => { state.topk = Math.max(0, parseInt(e.target.value, 10) || 0); drawAll(); });
  el("by").addEventListener("change", e => { state.by = e.target.value; drawCurves(); });
  el("logmetric").addEventListener("change", e => { state.logMetric = e.target.checked; drawParallel(); drawCurves(); });
}

// The next request only once this one is answered (and drawn): a slow server is never asked twice at once.
async function refresh() {
  try {
    const response = await fetch("data.json", {cache: "no-store"});
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    DATA = await response.json();
    setupControls();
    drawAll();
    el("error").textContent = "";
  } catch (err) {
    el("error").textContent = "cannot refresh: " + err.message;
  }
  setTimeout(refresh, REFRESH_MS);
}

state.topk = DATA.runs.length > 50 ? 50 : 0;
el("topk").value = state.topk;
setupControls();
wire();
drawAll();
const REFRESH_MS = Number(document.body.dataset.refreshMs) || 3000;
if (LIVE) setTimeout(refresh, REFRESH_MS);
