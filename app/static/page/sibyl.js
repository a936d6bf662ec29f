// Sibyl's page: pick a model, predict one row or a batch, copy it as curl, watch live status.
// Plain JavaScript, no build step, no library. API data is only ever set as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], model: null, desc: null, version: "", table: null, polling: false, timer: 0, last: null };
// A JSON number token, as the JSON grammar spells it: such text is sent as the number itself, anything else as text.
const NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/;

/** An element with attributes and children; strings become text nodes, so nothing is parsed as HTML. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

/** An API failure: the API's own message, its HTTP status and the request id when there was an answer. */
class ApiError extends Error {
  constructor(message, status = 0, requestId = null) {
    super(message);
    this.status = status;
    this.requestId = requestId;
  }
}

/** fetch() a same-origin API path (the browser adds the basic-auth credentials); the JSON body, headers and the
 * round trip in ms, or an ApiError carrying the API's message. */
async function api(path, options = {}) {
  const started = performance.now();
  let response, text;
  try {
    // No `cache` option: "no-store" would send Cache-Control: no-cache, and Sibyl would bypass its row cache.
    response = await fetch(path, { credentials: "same-origin", ...options });
    text = await response.text();
  } catch (err) {
    throw new ApiError(`Could not reach the server (${err.message}). Check the connection, then try again.`);
  }
  const roundTrip = performance.now() - started;
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON (a proxy's HTML page, say): handled below without showing it
  }
  const requestId = response.headers.get("X-Request-ID");
  if (!response.ok) {
    const error = body && body.error;
    const message = error && typeof error.message === "string" ? error.message : null;
    throw new ApiError(message || `The server answered ${response.status} ${response.statusText}.`,
      response.status, (error && error.request_id) || requestId);
  }
  if (body === null) throw new ApiError("The server's answer was not JSON.", response.status, requestId);
  return { body, headers: response.headers, roundTrip };
}

/** Show an error (and its request id) in an element with role=alert. */
function showError(node, error) {
  node.replaceChildren(error.message);
  if (error.requestId) node.append(el("span", { class: "rid" }, ` Request ID ${error.requestId}.`));
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const pct = (p) => (p >= 0.001 ? `${(p * 100).toFixed(1)}%` : p > 0 ? "<0.1%" : "0%");
const ms = (v) => (v == null ? "–" : `${Number(v).toFixed(1)} ms`);
const shellQuote = (s) => `'${String(s).replace(/'/g, "'\\''")}'`;
const path = (...parts) => "/" + parts.map(encodeURIComponent).join("/");

// ---------- models ----------

/** Load GET /models and fill the pickers. */
async function loadModels() {
  try {
    state.models = (await api("/models")).body.models;
  } catch (error) {
    showError($("load-error"), new ApiError(`Could not load the models: ${error.message}`, 0, error.requestId));
    return;
  }
  $("model").replaceChildren(...state.models.map((m) => el("option", { value: m.name }, m.name)));
  chooseModel();
}

/** Fill the version picker for the chosen model: its versions, then its aliases, the default preselected. */
function chooseModel() {
  const model = state.models.find((m) => m.name === $("model").value) || state.models[0];
  state.model = model;
  if (!model) return;
  const versions = model.versions.map((v) =>
    el("option", { value: v.version }, v.version === model.default_version ? `${v.version} (default)` : v.version));
  const broken = model.unavailable.map((u) =>
    el("option", { value: u.version, disabled: "" }, `${u.version} (unavailable: ${u.reason})`));
  const aliases = Object.entries(model.aliases).map(([alias, v]) => el("option", { value: alias }, `${alias} → ${v}`));
  const groups = [el("optgroup", { label: "Versions" }, ...versions, ...broken)];
  if (aliases.length) groups.push(el("optgroup", { label: "Aliases" }, ...aliases));
  $("version").replaceChildren(...groups);
  $("version").value = model.default_version;
  chooseVersion();
}

/** Show the chosen version's description and rebuild the forms for its features. */
function chooseVersion() {
  const model = state.model;
  state.version = $("version").value;
  const target = Object.hasOwn(model.aliases, state.version) ? model.aliases[state.version] : state.version;
  const d = (state.desc = model.versions.find((v) => v.version === target));
  $("predict-submit").disabled = $("batch-submit").disabled = !d;
  if (!d) {
    // An alias may point at a version that failed to load (SKIP_BAD_MODELS): nothing to fill in or send.
    for (const id of ["model-info", "predict-fields", "predict-curl", "batch-curl"]) $(id).replaceChildren();
    return showError($("load-error"), new ApiError(`Version ${target} of ${model.name} is unavailable.`));
  }
  $("load-error").textContent = "";
  const names = d.feature_names ? d.feature_names.join(", ") : `${d.n_features}, unnamed`;
  const rows = [["Backend", d.backend], ["Cache policy", d.cache_policy], ["Task", d.task], ["Features", names]];
  if (d.classes) rows.push(["Classes", d.classes.join(", ")]);
  $("model-info").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v ?? "–"))]));
  buildFields();
  $("batch-proba").disabled = !hasProba();
  $("batch-result").hidden = true;
  $("batch-error").textContent = "";
  updateBatchCurl();
}

// GET /models says whether a version gives probabilities (a classifier with predict_proba).
const hasProba = () => state.desc.probabilities === true;
const featureNames = () =>
  state.desc.feature_names || [...Array(state.desc.n_features).keys()].map((i) => `feature ${i}`);
const predictUrl = () => path("models", state.model.name, "versions", state.version, "predict");

// ---------- predict ----------

/** One labelled input per feature, pre-filled with the version's sample row. */
function buildFields() {
  const sample = state.desc.sample_row || [];
  $("predict-fields").replaceChildren(...featureNames().map((name, i) => {
    // type=text, not number: any text must reach the server, whose message then names the feature.
    const input = el("input", { id: `f-${i}`, name, type: "text", autocomplete: "off", spellcheck: "false",
      "aria-describedby": `f-${i}-error` });
    input.value = sample[i] == null ? "" : String(sample[i]);
    const error = el("span", { id: `f-${i}-error`, class: "field-error", role: "alert" });
    return el("div", { class: "field" }, el("label", { for: `f-${i}` }, name), input, error);
  }));
  $("predict-result").hidden = true;
  clearPredictErrors();
  updatePredictCurl();
}

const fieldInputs = () => [...$("predict-fields").querySelectorAll("input")];

/** The JSON body's text, built by hand so that "1e400" reaches the server as the number token the user typed. */
function predictBody() {
  const token = (text) => (NUMBER.test(text.trim()) ? text.trim() : JSON.stringify(text));
  const values = fieldInputs().map((input) => token(input.value));
  const rows = state.desc.feature_names
    ? `"instances": [{${featureNames().map((n, i) => `${JSON.stringify(n)}: ${values[i]}`).join(", ")}}]`
    : `"features": [[${values.join(", ")}]]`;
  return `{${rows}${hasProba() ? ', "probabilities": true' : ""}}`;
}

function clearPredictErrors() {
  for (const input of fieldInputs()) {
    input.removeAttribute("aria-invalid");
    $(`${input.id}-error`).textContent = "";
  }
  $("predict-error").textContent = "";
}

async function predict(event) {
  event.preventDefault();
  const form = $("predict-form");
  if (form.getAttribute("aria-busy") === "true") return;
  form.setAttribute("aria-busy", "true");
  clearPredictErrors();
  try {
    const answer = await api(predictUrl(), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: predictBody(),
    });
    showPrediction(answer);
  } catch (error) {
    showPredictError(error);
  } finally {
    form.removeAttribute("aria-busy");
  }
}

/** The API's message beside the input it names (`'petal_length'`, or `[0][2]` for unnamed features), else above
 * the button. */
function showPredictError(error) {
  $("predict-result").hidden = true;
  const names = featureNames();
  let i = state.desc.feature_names ? names.findIndex((n) => error.message.includes(`'${n}'`)) : -1;
  const position = /\[0\]\[(\d+)\]/.exec(error.message);
  if (i < 0 && position && !state.desc.feature_names) i = Number(position[1]);
  const input = fieldInputs()[i];
  if (!input) return showError($("predict-error"), error);
  input.setAttribute("aria-invalid", "true");
  showError($(`${input.id}-error`), error);
  input.focus();
}

/** The label or value, probabilities as bars (highest first), latency, cache outcome and request id. */
function showPrediction({ body, headers, roundTrip }) {
  const label = body.predictions[0];
  $("predict-label").textContent = String(label);
  $("predict-label").dataset.value = JSON.stringify(label);
  const probabilities = Object.entries((body.probabilities || [])[0] || {}).sort((a, b) => b[1] - a[1]);
  $("predict-probs").replaceChildren(...probabilities.map(([cls, p]) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${p * 100}%`;
    return el("div", { class: "bar-row", "data-class": cls, "data-p": String(p) },
      el("span", { class: "bar-label" }, cls), el("span", { class: "bar-track" }, bar),
      el("span", { class: "bar-pct" }, pct(p)));
  }));
  $("predict-latency").textContent = latency(headers, roundTrip);
  $("predict-cache").textContent = cacheOutcome(headers, 1);
  $("predict-request-id").textContent = headers.get("X-Request-ID") || "–";
  $("predict-result").hidden = false;
}

/** "server 1.2 ms, round trip 4.0 ms": the server's own time from `Server-Timing: app;dur=<ms>`. */
function latency(headers, roundTrip) {
  let server = null;
  for (const entry of (headers.get("Server-Timing") || "").split(",")) {
    const [name, ...params] = entry.split(";").map((s) => s.trim());
    const dur = params.find((p) => p.startsWith("dur="));
    if (name === "app" && dur) server = Number(dur.slice(4));
  }
  return `server ${server == null ? "not reported" : ms(server)}, round trip ${ms(roundTrip)}`;
}

function cacheOutcome(headers, rows) {
  const outcome = headers.get("X-Cache");
  const hits = headers.get("X-Cache-Hits");
  if (!outcome) return "not reported";
  return hits == null ? outcome : `${outcome} (${hits} of ${plural(rows, "row")} from the cache)`;
}

// ---------- copy as curl ----------

/** The curl command that sends what is on screen; USER:KEY stands for the caller's credentials. */
function curl(url, type, data) {
  const header = shellQuote(`Content-Type: ${type}`);
  return `curl -u 'USER:KEY' -X POST -H ${header} ${data} ${shellQuote(location.origin + url)}`;
}

function updatePredictCurl() {
  $("predict-curl").textContent = curl(predictUrl(), "application/json", `-d ${shellQuote(predictBody())}`);
}

async function copy(button) {
  const pre = $(button.dataset.copy);
  const note = button.nextElementSibling;
  let copied = false;
  try {
    await navigator.clipboard.writeText(pre.textContent);
    copied = true;
  } catch {
    // No clipboard API (plain http to another host is not a secure context) or no permission: select and copy.
    const range = document.createRange();
    range.selectNodeContents(pre);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    copied = document.execCommand("copy");
  }
  note.textContent = copied ? "Copied" : "Selected: press Ctrl+C to copy";
  setTimeout(() => { note.textContent = ""; }, 4000);
}

// ---------- batch ----------

/** What the batch form would send: body, content type, URL, and the rows for display (columns + values). */
async function batchRequest() {
  const file = $("batch-file").files[0];
  const proba = hasProba() && $("batch-proba").checked;
  const text = file ? await file.text() : $("batch-text").value;
  if (!text.trim()) throw new ApiError("Paste rows or choose a file first.");
  const json = file ? /\.json$/i.test(file.name) || file.type.includes("json") : /^\s*[[{]/.test(text);
  if (!json) {
    const [columns = [], ...rows] = parseCsv(text);
    const url = `${predictUrl()}?probabilities=${proba}`;
    const data = file ? `--data-binary @${shellQuote(file.name)}` : `--data-binary ${shellQuote(text)}`;
    return { body: file || text, type: "text/csv", url, columns, rows, data };
  }
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new ApiError(`The rows are not valid JSON (${err.message}).`);
  }
  let rows, body;
  if (Array.isArray(parsed)) {
    rows = parsed;
    body = `{"instances": ${text.trim()}, "probabilities": ${proba}}`; // the rows as typed: numbers stay as written
  } else if (parsed && typeof parsed === "object" && ["features", "instances", "data"].some((k) => k in parsed)) {
    rows = parsed.features ?? parsed.instances ?? parsed.data;
    body = Object.hasOwn(parsed, "probabilities")
      ? JSON.stringify({ ...parsed, probabilities: proba })
      : text.trim().replace(/}$/, `, "probabilities": ${proba}}`); // as typed, with the checkbox's choice added
  } else {
    throw new ApiError('Paste a JSON list of rows, a body with "features", "instances" or "data", ' +
      "or CSV with a header row.");
  }
  if (Array.isArray(rows) && rows.length && !rows.some((r) => r && typeof r === "object")) rows = [rows]; // one flat row
  rows = Array.isArray(rows) ? rows : [];
  const named = rows.find((r) => r && !Array.isArray(r) && typeof r === "object");
  const columns = named ? state.desc.feature_names || Object.keys(named) : featureNames();
  const cells = rows.map((r) => (Array.isArray(r) ? r : columns.map((c) => r && r[c])).map(cellText));
  return { body, type: "application/json", url: predictUrl(), columns, rows: cells, data: `-d ${shellQuote(body)}` };
}

const cellText = (v) => (typeof v === "string" ? v : v === undefined ? "" : JSON.stringify(v));

/** CSV as Python's csv module reads it (quoted fields, "" inside quotes), blank lines skipped as the server does. */
function parseCsv(text) {
  const rows = [];
  let row = [], field = "", quoted = false;
  text = text.replace(/^\uFEFF/, "");
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c !== '"') field += c;
      else if (text[i + 1] === '"') field += text[++i];
      else quoted = false;
    } else if (c === '"' && field === "") quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field); rows.push(row); row = []; field = "";
    } else field += c;
  }
  if (field !== "" || row.length) { row.push(field); rows.push(row); }
  return rows.filter((r) => r.length > 1 || r[0] !== "");
}

async function updateBatchCurl() {
  try {
    const request = await batchRequest();
    $("batch-curl").textContent = curl(request.url, request.type, request.data);
  } catch (error) {
    $("batch-curl").textContent = error instanceof ApiError ? error.message : "";
  }
  const file = $("batch-file").files[0];
  $("batch-source").textContent = file ? `Scoring the file ${file.name} (${plural(file.size, "byte")}); ` +
    "typing above clears it." : "";
}

async function scoreBatch(event) {
  event.preventDefault();
  const form = $("batch-form");
  if (form.getAttribute("aria-busy") === "true") return;
  form.setAttribute("aria-busy", "true");
  $("batch-error").textContent = "";
  try {
    const request = await batchRequest();
    const headers = { "Content-Type": request.type };
    const answer = await api(request.url, { method: "POST", headers, body: request.body });
    showBatch(request, answer);
  } catch (error) {
    $("batch-result").hidden = true;
    showError($("batch-error"), error);
  } finally {
    form.removeAttribute("aria-busy");
  }
}

const SHOWN_ROWS = 1000; // the table stays quick to draw; the download holds every row

/** The answer as a table: row number, the input values, the prediction, one column per class probability. */
function showBatch(request, { body, headers, roundTrip }) {
  const classes = body.probabilities ? Object.keys(body.probabilities[0] || {}) : [];
  const header = ["row", ...request.columns, "prediction", ...classes.map((c) => `p(${c})`)];
  const inputs = (i) => request.rows[i] || request.columns.map(() => "");
  const rows = body.predictions.map((prediction, i) =>
    [String(i + 1), ...inputs(i), cellText(prediction), ...classes.map((c) => String(body.probabilities[i][c]))]);
  state.table = [header, ...rows];
  const first = request.columns.length + 2; // where the probability columns start
  const tr = (cells, tag) => el("tr", {}, ...cells.map((cell, j) => {
    const probability = tag === "td" && j >= first;
    const attrs = probability ? { "data-p": cell, class: "num" } : tag === "th" ? { scope: "col" } : {};
    return el(tag, attrs, probability ? pct(Number(cell)) : cell);
  }));
  const shown = rows.slice(0, SHOWN_ROWS).map((row) => tr(row, "td"));
  $("batch-table").replaceChildren(el("thead", {}, tr(header, "th")), el("tbody", {}, ...shown));
  const more = rows.length > SHOWN_ROWS ? ` Showing the first ${SHOWN_ROWS}; the download holds them all.` : "";
  $("batch-meta").textContent = `${plural(rows.length, "row")}; ${latency(headers, roundTrip)}; ` +
    `cache ${cacheOutcome(headers, rows.length)}; request ID ${headers.get("X-Request-ID") || "–"}.${more}`;
  $("batch-result").hidden = false;
}

/** Download the table as predictions.csv (an object URL is not fetched, so the CSP allows it). */
function download() {
  const quote = (cell) => (/[",\r\n]/.test(cell) ? `"${cell.replace(/"/g, '""')}"` : cell);
  const text = state.table.map((row) => row.map(quote).join(",")).join("\r\n") + "\r\n";
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  const link = el("a", { href: url, download: "predictions.csv" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------- status ----------

const statusShown = () => !$("panel-status").hidden && document.visibilityState === "visible";

/** Poll GET /status every 5 s while the Status tab is shown and the page visible. */
async function pollStatus() {
  clearTimeout(state.timer);
  if (!statusShown() || state.polling) return;
  state.polling = true;
  let again = true;
  try {
    const answer = await api("/status");
    $("status-error").textContent = "";
    renderStatus(answer.body);
  } catch (error) {
    showError($("status-error"), error);
    again = error.status !== 401 && error.status !== 403; // no role: asking again changes nothing
  } finally {
    state.polling = false;
  }
  if (again && statusShown()) state.timer = setTimeout(pollStatus, 5000);
}

function renderStatus(body) {
  const now = performance.now();
  const last = state.last;
  state.last = { at: now, requests: {} };
  $("status-cards").replaceChildren(...body.models.map((m) => {
    const key = `${m.name}\u0000${m.version}`;
    state.last.requests[key] = m.requests;
    // Requests per second between two polls; none before the second poll or after a restart reset the counts.
    const before = last && last.requests[key];
    const rate = before != null && m.requests >= before ? (m.requests - before) / ((now - last.at) / 1000) : null;
    const items = [
      ["Requests", m.requests, "requests"],
      ["Requests/s", rate == null ? "–" : rate.toFixed(2), "rate"],
      ["Error rate", m.error_rate == null ? "–" : `${pct(m.error_rate)} (${plural(m.errors, "error")})`, "error-rate"],
      ["Latency p50 / p99", `${ms(m.latency_ms?.p50)} / ${ms(m.latency_ms?.p99)}`, "latency"],
      ["Rows answered", m.rows, "rows"],
      ["Cache hit ratio", cacheRatio(m.cache), "cache"],
      ...drift(m.drift),
      ...feedback(m.feedback),
    ];
    const dl = el("dl", {}, ...items.flatMap(([term, value, field, flag]) =>
      [el("dt", {}, term), el("dd", { "data-field": field, class: flag ? "flag" : "" }, String(value ?? "–"))]));
    return el("article", { class: "card", "data-model": m.name, "data-version": m.version },
      el("h3", {}, `${m.name}, version ${m.version}`), dl);
  }));
  if (!body.models.length) $("status-cards").append(el("p", {}, "No model versions yet."));
  const t = new Date();
  const hms = [t.getHours(), t.getMinutes(), t.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
  $("status-updated").textContent = `Figures since the server started; updated ${hms}.`;
}

const cacheRatio = (c) =>
  !c ? "off" : c.hit_ratio == null ? "no lookups yet" : `${pct(c.hit_ratio)} of ${plural(c.requests, "lookup")}`;

/** PSI above 0.25 is the usual "the population has shifted" threshold: flagged in words, not by colour alone. */
function drift(d) {
  if (!d) return [["Drift", "not enough rows yet", "drift"]];
  const psi = (v) => (v == null ? "–" : `${v.toFixed(3)}${v > 0.25 ? " (drift)" : ""}`);
  const [feature, worst] = Object.entries(d.features || {}).sort((a, b) => b[1] - a[1])[0] || [];
  const rows = [["Prediction PSI", psi(d.prediction_psi), "psi", d.prediction_psi > 0.25]];
  if (feature) rows.push(["Worst feature PSI", `${feature} ${psi(worst)}`, "feature-psi", worst > 0.25]);
  return rows;
}

function feedback(f) {
  if (!f || !f.rows) return [];
  const rows = [["Feedback rows", f.rows, "feedback"]];
  if (f.accuracy != null) rows.push(["Accuracy", pct(f.accuracy), "accuracy"]);
  if (f.mae != null) rows.push(["MAE / RMSE", `${f.mae.toPrecision(3)} / ${f.rmse.toPrecision(3)}`, "mae"]);
  return rows;
}

// ---------- tabs ----------

const tabs = () => [...document.querySelectorAll('[role="tab"]')];

/** Show a tab's panel (roving tabindex: only the selected tab is in the Tab order). */
function selectTab(tab, focus = false) {
  for (const t of tabs()) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  pollStatus();
}

/** Arrow keys move between tabs (wrapping), Home and End go to the first and last. */
function tabKey(event) {
  const all = tabs();
  const i = all.indexOf(document.activeElement);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: all.length - 1 }[event.key];
  if (i < 0 || next === undefined) return;
  event.preventDefault();
  selectTab(all[(next + all.length) % all.length], true);
}

// ---------- wiring ----------

document.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", chooseModel);
  $("version").addEventListener("change", chooseVersion);
  $("predict-form").addEventListener("submit", predict);
  $("predict-form").addEventListener("input", updatePredictCurl);
  $("batch-form").addEventListener("submit", scoreBatch);
  $("batch-text").addEventListener("input", () => { $("batch-file").value = ""; updateBatchCurl(); });
  $("batch-file").addEventListener("change", updateBatchCurl);
  $("batch-proba").addEventListener("change", updateBatchCurl);
  $("batch-download").addEventListener("click", download);
  for (const button of document.querySelectorAll("[data-copy]")) button.addEventListener("click", () => copy(button));
  for (const tab of tabs()) tab.addEventListener("click", () => selectTab(tab));
  document.querySelector('[role="tablist"]').addEventListener("keydown", tabKey);
  document.addEventListener("visibilitychange", pollStatus);
  loadModels();
});
