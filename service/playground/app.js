// The preference playground: plain JS against the service's own /v1 API, nothing loaded from elsewhere.
// State lives in memory only (the API key too). Requests: /v1/info once, /v1/tradeoff for the preview,
// the uniform reference and the heat map, /v1/predict for the predictions and (several preferences in
// one request) the comparison.
"use strict";

const DELAY_MS = 50;  // coalescing window: at most one request per view per window, always the latest state
const MAX_PINS = 3;
const GRID = { 2: 24, 3: 12 };  // heat-map subdivisions of the simplex per task count (91 points for 3 tasks)
const DEFAULT_TEXTS = [
  "Congratulations! You have won a free cruise, text WIN to 80082 now",
  "What is the capital of Australia?",
  "A warm, funny film with a wonderful cast.",
].join("\n");
// Viridis at five stops: readable in greyscale and by most colour-blind readers.
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

const S = {
  info: null, tasks: [], key: null, needsKey: false, shares: [], uniform: null, grid: null, heatTask: 0,
  pins: [], errors: new Map(), vertices: [],
};
const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

function svg(tag, attrs = {}) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

// ---- API ------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
    this.retryAfter = retryAfter;
  }
}

async function api(path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (S.key) headers.Authorization = `Bearer ${S.key}`;
  let response;
  try {
    response = await fetch(path, {
      method: body === undefined ? "GET" : "POST", headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new ApiError(0, { title: "Service unreachable", detail: `${exc.message}: is the server still running?` });
  }
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch { /* not JSON: reported below */ }
  if (!response.ok) {
    const problem = data && typeof data === "object" ? data : { title: response.statusText, detail: text };
    throw new ApiError(response.status, problem, response.headers.get("Retry-After"));
  }
  return data;
}

// Errors are kept per view, so one view's success does not hide another's problem.
function report(source, err) {
  if (err === null) S.errors.delete(source);
  else if (err instanceof ApiError) S.errors.set(source, err);
  else throw err;
  const box = $("error");
  box.replaceChildren(...[...S.errors.values()].map((e) => {
    const p = e.problem;
    const parts = [`${e.status ? e.status + " " : ""}${p.title || "Error"}: ${p.detail || ""}`];
    if (p.field) parts.push(`(field ${p.field})`);
    if (e.retryAfter) parts.push(`Retry after ${e.retryAfter} s.`);
    if (p.request_id) parts.push(`[request ${p.request_id}]`);
    return h("p", { text: parts.join(" ") });
  }));
  box.hidden = S.errors.size === 0;
  const unauthorized = [...S.errors.values()].find((e) => e.status === 401);
  if (unauthorized) askForKey(unauthorized.problem.detail);
}

function askForKey(detail) {
  $("auth").hidden = false;
  $("auth-detail").textContent = detail;
  $("api-key").focus();
}

// One view's requests: a change is sent at once when the view is idle; changes that follow within
// DELAY_MS of the last request, or while it is in flight, are coalesced into one request with the
// latest state. The section is aria-busy until its view shows the latest state.
function view(section, task) {
  let running = false, again = false, timer = 0, last = -Infinity;
  async function run() {
    timer = 0;
    if (running) { again = true; return; }
    running = true;
    try {
      do { again = false; last = performance.now(); await task(); } while (again);
    } finally {
      running = false;
      if (!timer) section.setAttribute("aria-busy", "false");
    }
  }
  return () => {
    section.setAttribute("aria-busy", "true");
    if (!timer) timer = setTimeout(run, Math.max(0, last + DELAY_MS - performance.now()));
  };
}

// ---- preference ------------------------------------------------------------------------------------
const round = (x, digits) => Math.round(x * 10 ** digits) / 10 ** digits;
const fmtShare = (x) => String(round(x, 6));
const fmtLoss = (x) => x.toPrecision(4);
const pct = (x) => `${(100 * x).toFixed(1)}%`;

// The request's preference: task -> share, 4 decimals (the service normalises; the page and the
// snippets send exactly this).
function preferenceOf(shares) {
  return Object.fromEntries(S.tasks.map((t, i) => [t, round(shares[i], 4)]));
}

function texts() {
  return $("texts").value.split("\n").filter((line) => line.trim() !== "");
}

// Setting one task's share rescales the others proportionally, so the shares always sum to 1 and a
// slider at 100% is that task's one-hot preference. `typing`: leave that task's number field as typed.
function setShare(t, value, typing = false) {
  value = Math.min(1, Math.max(0, value));
  const n = S.tasks.length;
  const others = S.shares.reduce((s, w, i) => (i === t ? s : s + w), 0);
  S.shares = S.shares.map((w, i) => {
    if (i === t) return value;
    return others > 1e-12 ? (w * (1 - value)) / others : (1 - value) / (n - 1);
  });
  changed(typing ? t : null);
}

function setShares(shares) {
  const sum = shares.reduce((a, b) => a + b, 0);
  S.shares = shares.map((w) => w / sum);
  changed();
}

function changed(except = null) {
  S.shares.forEach((w, i) => {
    $(`range-${i}`).value = String(100 * w);
    if (i !== except) $(`share-${i}`).value = (100 * w).toFixed(1);
    $(`share-${i}`).removeAttribute("aria-invalid");
  });
  drawMarker();
  renderSnippets();
  tradeoffView();
  predictionsView();
  updatePinButton();
}

function buildControls() {
  const n = S.tasks.length;
  const presets = $("presets");
  const equal = () => setShares(S.tasks.map(() => 1));
  presets.replaceChildren(h("button", { type: "button", text: "Equal", onclick: equal }));
  S.tasks.forEach((t, i) => presets.append(h("button", {
    type: "button", text: `Only ${t}`, onclick: () => setShares(S.tasks.map((_, j) => (j === i ? 1 : 0))),
  })));
  if (n > 1) {  // twice the weight of each other task
    S.tasks.forEach((t, i) => presets.append(h("button", {
      type: "button", text: `Favour ${t}`, onclick: () => setShares(S.tasks.map((_, j) => (j === i ? 2 : 1))),
    })));
  }
  $("sliders").replaceChildren(...S.tasks.map((t, i) => h("div", { class: "slider" },
    h("label", { for: `range-${i}`, id: `label-${i}`, text: t }),
    h("input", {
      id: `range-${i}`, type: "range", min: 0, max: 100, step: 1, disabled: n < 2,
      oninput: (e) => setShare(i, e.target.valueAsNumber / 100),
    }),
    h("input", {
      id: `share-${i}`, type: "number", min: 0, max: 100, step: 0.1, inputmode: "decimal", disabled: n < 2,
      "aria-labelledby": `label-${i} unit-${i}`,
      oninput: (e) => {
        const v = e.target.valueAsNumber;
        if (!Number.isFinite(v) || v < 0 || v > 100) { e.target.setAttribute("aria-invalid", "true"); return; }
        setShare(i, v / 100, true);
      },
    }),
    h("span", { id: `unit-${i}`, class: "unit", text: "%" }),
  )));
  $("heat-task").replaceChildren(...S.tasks.map((t, i) => h("option", { value: i, text: t })));
}

// ---- simplex and heat map -----------------------------------------------------------------------------
function layoutSimplex() {
  const n = S.tasks.length;
  const fig = $("simplex-figure");
  fig.hidden = !(n === 2 || n === 3);
  $("no-simplex").hidden = !fig.hidden || n < 2;
  if (fig.hidden) return;
  const box = $("simplex");
  if (n === 3) {
    box.setAttribute("viewBox", "0 0 240 232");
    S.vertices = [[120, 24.4], [14, 208], [226, 208]];
  } else {
    box.setAttribute("viewBox", "0 0 240 64");
    S.vertices = [[14, 30], [226, 30]];
  }
  box.replaceChildren(svg("g", { id: "heat" }), svg("g", { id: "frame" }), svg("circle", { id: "marker", r: 6 }));
  const frame = box.querySelector("#frame");
  if (n === 3) {
    frame.append(svg("polygon", { points: S.vertices.map((v) => v.join(",")).join(" "), class: "outline" }));
    const anchors = ["middle", "start", "end"];
    const offsets = [[0, -10], [-8, 18], [8, 18]];
    S.vertices.forEach(([x, y], i) => {
      const [dx, dy] = offsets[i];
      const label = svg("text", { x: x + dx, y: y + dy, "text-anchor": anchors[i], class: "vertex" });
      label.textContent = S.tasks[i];
      frame.append(label);
    });
  } else {
    frame.append(svg("rect", { x: 14, y: 18, width: 212, height: 24, class: "outline" }));
    S.vertices.forEach(([x], i) => {
      const label = svg("text", { x, y: 60, "text-anchor": i ? "end" : "start", class: "vertex" });
      label.textContent = S.tasks[i];
      frame.append(label);
    });
  }
  drawMarker();
}

function pointOf(shares) {
  return S.vertices.reduce(([x, y], v, i) => [x + shares[i] * v[0], y + shares[i] * v[1]], [0, 0]);
}

function sharesAt(x, y) {
  let w;
  if (S.vertices.length === 2) {
    const [[x0], [x1]] = S.vertices;
    const a = (x1 - x) / (x1 - x0);
    w = [a, 1 - a];
  } else {
    const [[ax, ay], [bx, by], [cx, cy]] = S.vertices;
    const det = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy);
    const a = ((by - cy) * (x - cx) + (cx - bx) * (y - cy)) / det;
    const b = ((cy - ay) * (x - cx) + (ax - cx) * (y - cy)) / det;
    w = [a, b, 1 - a - b];
  }
  w = w.map((v) => Math.max(0, v));  // outside the simplex: the nearest edge, near enough for a pointer
  const sum = w.reduce((s, v) => s + v, 0);
  return w.map((v) => round(v / sum, 4));
}

function drawMarker() {
  const marker = $("marker");
  if (!marker || !S.vertices.length) return;
  const [x, y] = pointOf(S.shares);
  marker.setAttribute("cx", x);
  marker.setAttribute("cy", S.vertices.length === 2 ? 30 : y);
  const shares = S.tasks.map((t, i) => `${t} ${Math.round(100 * S.shares[i])}%`).join(", ");
  $("simplex").setAttribute("aria-label", `Preference on the simplex: ${shares}`);
}

function wireSimplex() {
  const box = $("simplex");
  const at = (e) => {
    const p = new DOMPoint(e.clientX, e.clientY).matrixTransform(box.getScreenCTM().inverse());
    setShares(sharesAt(p.x, p.y));
  };
  box.addEventListener("pointerdown", (e) => { box.setPointerCapture(e.pointerId); at(e); });
  box.addEventListener("pointermove", (e) => { if (box.hasPointerCapture(e.pointerId)) at(e); });
  box.addEventListener("keydown", (e) => {
    const step = { ArrowLeft: [-4, 0], ArrowRight: [4, 0], ArrowUp: [0, -4], ArrowDown: [0, 4] }[e.key];
    if (!step) return;
    e.preventDefault();
    const [x, y] = pointOf(S.shares);
    setShares(sharesAt(x + step[0], y + step[1]));
  });
  $("heat-task").addEventListener("change", (e) => { S.heatTask = Number(e.target.value); drawHeat(); });
}

function gridPoints(n, tasks) {
  const points = [];
  if (tasks === 2) for (let i = 0; i <= n; i++) points.push([i, n - i]);
  else for (let i = 0; i <= n; i++) for (let j = 0; j <= n - i; j++) points.push([i, j, n - i - j]);
  return points;
}

// The grid's trade-offs, several preferences per request within the service's limit, one request at a time.
async function loadHeat() {
  const tasks = S.tasks.length;
  if (!GRID[tasks]) return;
  const n = GRID[tasks];
  const points = gridPoints(n, tasks);
  const chunk = S.info.limits.max_preferences;
  const kept = [];
  try {
    for (let start = 0; start < points.length; start += chunk) {
      const batch = points.slice(start, start + chunk);
      $("status").textContent = `Heat map: ${start} of ${points.length} preferences…`;
      const answer = await api("/v1/tradeoff", { preferences: batch.map((p) => p.map((k) => k / n)) });
      for (const r of answer.results) kept.push(S.tasks.map((t) => r.tasks[t].quality_kept));
    }
    report("heat", null);
  } catch (err) {
    report("heat", err);
    return;
  } finally {
    $("status").textContent = "";
  }
  S.grid = { n, points, kept };
  drawHeat();
}

function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  const c = RAMP[i].map((v, k) => Math.round(v + f * (RAMP[i + 1][k] - v)));
  return `rgb(${c.join(",")})`;
}

function drawHeat() {
  const g = $("heat");
  if (!g || !S.grid) return;
  const { n, points, kept } = S.grid;
  const t = S.heatTask;
  const values = kept.map((row) => row[t]);
  const lo = Math.min(...values), hi = Math.max(...values);
  const scale = (v) => (hi > lo ? (v - lo) / (hi - lo) : 1);
  const index = new Map(points.map((p, k) => [p.slice(0, -1).join(","), k]));
  const at = (...p) => index.get(p.join(","));
  const cells = [];
  const cell = (ks) => {
    const shares = ks.map((k) => points[k].map((c) => c / n));
    const v = ks.reduce((s, k) => s + values[k], 0) / ks.length;
    const corners = shares.map(pointOf);
    const fill = colour(scale(v));
    return svg("polygon", { points: corners.map((c) => c.join(",")).join(" "), fill, stroke: fill });
  };
  if (S.tasks.length === 2) {
    for (let i = 0; i < n; i++) {
      const [x0] = pointOf([i / n, 1 - i / n]), [x1] = pointOf([(i + 1) / n, 1 - (i + 1) / n]);
      const v = (values[at(i)] + values[at(i + 1)]) / 2;
      const width = Math.abs(x1 - x0) + 0.5;  // overlapping by half a unit: no seams
      cells.push(svg("rect", { x: Math.min(x0, x1), y: 18, width, height: 24, fill: colour(scale(v)) }));
    }
  } else {
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < n - i; j++) {
        cells.push(cell([at(i, j), at(i + 1, j), at(i, j + 1)]));
        if (i + j < n - 1) cells.push(cell([at(i + 1, j), at(i, j + 1), at(i + 1, j + 1)]));
      }
    }
  }
  g.replaceChildren(...cells);
  $("legend-low").textContent = pct(lo);
  $("legend-high").textContent = pct(hi);
}

// ---- views -------------------------------------------------------------------------------------------
let tradeoffView, predictionsView, compareView;  // set in wire(): each coalesces its own requests

async function showTradeoff() {
  let answer;
  try {
    answer = await api("/v1/tradeoff", { preference: preferenceOf(S.shares) });
    report("tradeoff", null);
  } catch (err) {
    report("tradeoff", err);
    return;
  }
  const result = answer.results[0];
  $("canonical").textContent = S.tasks.map((t) => `${t} ${fmtShare(result.preference[t])}`).join(" · ");
  $("tradeoff-fingerprint").textContent = result.fingerprint;
  $("tradeoff-table").tBodies[0].replaceChildren(...S.tasks.map((t) => {
    const { loss, best, quality_kept: kept } = result.tasks[t];
    return h("tr", { "data-task": t },
      h("th", { scope: "row" }, breakable(t)),
      h("td", { class: "num loss", text: fmtLoss(loss) }),
      h("td", { class: "num best", text: fmtLoss(best) }),
      h("td", { class: "num uniform", text: S.uniform ? fmtLoss(S.uniform.tasks[t].loss) : "…" }),
      h("td", { class: "kept" }, h("span", { class: "kept-cell" },
        bar(kept, `${t}: keeps ${pct(kept)}`), h("span", { class: "num", text: pct(kept) }))));
  }));
}

// A task name that may wrap after its underscores (narrow tables on a phone), never inside a word.
function breakable(name) {
  return name.split("_").flatMap((part, i) => (i ? [h("wbr"), `_${part}`] : [part]));
}

function bar(fraction, label) {
  const fill = h("span", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
  return h("span", { class: "bar", role: "img", "aria-label": label }, fill);
}

async function showPredictions() {
  const inputs = texts();
  const list = $("prediction-list");
  if (!inputs.length) {
    list.replaceChildren(h("p", { class: "hint", text: "Type at least one line to see predictions." }));
    report("predict", null);
    return;
  }
  let answer;
  try {
    answer = await api("/v1/predict", { texts: inputs, preference: preferenceOf(S.shares) });
    report("predict", null);
  } catch (err) {
    report("predict", err);
    return;
  }
  const result = answer.results[0];
  $("fingerprint").textContent = result.fingerprint;
  list.replaceChildren(...result.predictions.map((row, i) => h("article", { class: "input", "data-input": i },
    h("p", { class: "text", text: inputs[i] }),
    h("div", { class: "tasks" }, ...S.tasks.filter((t) => row[t]).map((t) => taskPrediction(t, row[t]))))));
}

function taskPrediction(task, prediction) {
  return h("div", { class: "task", "data-task": task },
    h("p", {},
      h("span", { class: "muted", text: `${task}: ` }), h("strong", { class: "label", text: prediction.label })),
    h("ul", { class: "probs", "aria-label": `${task} class probabilities` },
      ...Object.entries(prediction.probabilities).map(([label, p]) => h("li", {
        class: label === prediction.label ? "top" : null, "data-class": label,
      }, h("span", { class: "cls", text: label }), bar(p, `${label} ${pct(p)}`),
      h("span", { class: "num p", text: pct(p) })))));
}

// ---- compare --------------------------------------------------------------------------------------------
function pinKey(pref) { return JSON.stringify(pref); }

function updatePinButton() {
  const here = pinKey(preferenceOf(S.shares));
  const full = S.pins.length >= MAX_PINS;
  const dup = S.pins.some((p) => pinKey(p) === here);
  $("pin").disabled = full || dup;
  const note = full ? `${MAX_PINS} pinned: unpin one to pin another.` : dup ? "This preference is pinned." : "";
  $("pin-note").textContent = note;
}

function pin() {
  S.pins.push(preferenceOf(S.shares));
  updatePinButton();
  compareView();
}

async function showCompare() {
  const box = $("compare-columns");
  const inputs = texts();
  if (!S.pins.length) {
    const hint = "Nothing pinned yet: set a preference and press “Pin for compare”.";
    box.replaceChildren(h("p", { class: "hint", text: hint }));
    report("compare", null);
    return;
  }
  const pins = S.pins.slice();
  let predicted, tradeoffs;
  try {
    [predicted, tradeoffs] = await Promise.all([
      inputs.length ? api("/v1/predict", { texts: inputs, preferences: pins }) : null,
      api("/v1/tradeoff", { preferences: pins }),
    ]);
    report("compare", null);
  } catch (err) {
    report("compare", err);
    return;
  }
  box.replaceChildren(...pins.map((_, k) =>
    column(k, tradeoffs.results[k], predicted && predicted.results[k], inputs)));
}

function unpin(k) {
  S.pins.splice(k, 1);
  updatePinButton();
  compareView();
}

// One pinned preference: its trade-off and, per input and task, the label and its probability.
function column(k, trade, result, inputs) {
  const heads = ["Task", "Loss", "Kept"].map((name) => h("th", { scope: "col", text: name }));
  const label = `Pinned preference ${k + 1}`;
  return h("section", { class: "column", "data-fingerprint": trade.fingerprint, "aria-label": label },
    h("div", { class: "row" },
      h("h3", { text: S.tasks.map((t) => `${t} ${fmtShare(trade.preference[t])}`).join(" · ") }),
      h("button", { type: "button", class: "unpin", text: "Unpin", onclick: () => unpin(k) })),
    h("p", { class: "hint" }, "head ", h("code", { class: "fp", text: trade.fingerprint })),
    h("table", {},
      h("thead", {}, h("tr", {}, heads)),
      h("tbody", {}, ...S.tasks.map((t) => h("tr", { "data-task": t },
        h("th", { scope: "row" }, breakable(t)),
        h("td", { class: "num loss", text: fmtLoss(trade.tasks[t].loss) }),
        h("td", { class: "num kept", text: pct(trade.tasks[t].quality_kept) }))))),
    result ? h("ol", { class: "compact" }, ...result.predictions.map((row, i) => h("li", { "data-input": i },
      h("p", { class: "text", text: inputs[i] }),
      ...S.tasks.filter((t) => row[t]).map((t) => h("p", { "data-task": t },
        h("span", { class: "muted", text: `${t}: ` }), h("strong", { class: "label", text: row[t].label }),
        h("span", { class: "num p", text: ` ${pct(row[t].probabilities[row[t].label])}` })))))) : null);
}

// ---- use it ---------------------------------------------------------------------------------------------
const shellQuote = (s) => `'${s.replace(/'/g, `'\\''`)}'`;

function renderSnippets() {
  const body = { texts: texts(), preference: preferenceOf(S.shares) };
  const origin = window.location.origin;
  const lines = [
    `curl -sS ${shellQuote(origin + "/v1/predict")}`,
    "-H 'Content-Type: application/json'",
    ...(S.needsKey ? ['-H "Authorization: Bearer $REPRMERGE_API_KEY"'] : []),
    `-d ${shellQuote(JSON.stringify(body))}`,
  ];
  $("curl").textContent = lines.join(" \\\n  ");
  const client = S.needsKey ? `Client(${JSON.stringify(origin)}, api_key=os.environ["REPRMERGE_API_KEY"])`
    : `Client(${JSON.stringify(origin)})`;
  $("python").textContent = [
    ...(S.needsKey ? ["import os", ""] : []),
    "from service.client import Client",
    "",
    `with ${client} as client:`,
    "    answer = client.predict(",
    `        ${JSON.stringify(body.texts)},`,
    `        ${JSON.stringify(body.preference)},`,
    "    )",
    "print(answer.model_dump_json(indent=2, exclude_none=True))",
  ].join("\n");
}

async function copy(button) {
  const code = $(button.dataset.copy);
  const was = button.textContent;
  try {
    await navigator.clipboard.writeText(code.textContent);
    button.textContent = "Copied";
  } catch {
    window.getSelection().selectAllChildren(code);  // no clipboard access: select it for Ctrl+C
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { button.textContent = was; }, 1500);
}

// ---- start ----------------------------------------------------------------------------------------------
function showIdentity(info) {
  const merge = info.merge || {};
  const params = Object.entries(merge.parameters || {})
    .filter(([, v]) => !(Array.isArray(v) && v.length === 0)).map(([k, v]) => `${k} ${v}`).join(", ");
  const entries = [
    ["Bundle", h("code", { text: info.bundle_id })],
    ["Tasks", h("ul", { class: "plain" }, ...info.tasks.map((t) => h("li", {},
      h("strong", { text: t.name }), ` (${t.labels.join(", ")})`)))],
    ["Merge", `${merge.method ?? "?"}${params ? ` (${params})` : ""}`],
    ["Beta (β)", String(info.correction?.beta ?? "?")],
    ["Device", info.device],
    ["Model", `${info.model_name}, d = ${info.representation_dim}`],
  ];
  $("identity").replaceChildren(...entries.map(([k, v]) => h("div", {}, h("dt", { text: k }), h("dd", {}, v))));
}

async function start() {
  let info;
  try {
    info = await api("/v1/info");
    report("info", null);
  } catch (err) {
    report("info", err);
    return;
  }
  S.info = info;
  S.tasks = info.tasks.map((t) => t.name);
  S.needsKey = S.key !== null;
  S.shares = S.tasks.map(() => 1 / S.tasks.length);
  S.grid = null;
  $("auth").hidden = true;
  $("main").hidden = false;
  showIdentity(info);
  buildControls();
  layoutSimplex();
  changed();
  compareView();
  try {
    S.uniform = (await api("/v1/tradeoff", { preference: S.tasks.map(() => 1) })).results[0];
    report("uniform", null);
    tradeoffView();
  } catch (err) {
    report("uniform", err);
  }
  await loadHeat();
}

function wire() {
  tradeoffView = view($("tradeoff"), showTradeoff);
  predictionsView = view($("predictions"), showPredictions);
  compareView = view($("compare"), showCompare);
  $("texts").value = DEFAULT_TEXTS;
  $("texts").addEventListener("input", () => {
    renderSnippets();
    predictionsView();
    if (S.pins.length) compareView();
  });
  $("pin").addEventListener("click", pin);
  for (const b of document.querySelectorAll("button.copy")) b.addEventListener("click", () => copy(b));
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    S.key = $("api-key").value.trim() || null;
    $("api-key").value = "";
    S.errors.clear();
    report("info", null);
    start();
  });
  wireSimplex();
}

document.addEventListener("DOMContentLoaded", () => { wire(); start(); });
