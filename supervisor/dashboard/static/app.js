// mrq dashboard: plain JavaScript, no framework and no build step.
// Live data comes from the server-sent events of api/stream: a `status` frame every
// second (every node's instances) and an `event` frame for each supervisor event.
"use strict";

const TOKEN = document.querySelector('meta[name="mrq-token"]').content;
const HISTORY_KEY = "mrq.console.history";
const HISTORY_MAX = 20;
const LOG_MAX_LINES = 5000;
const EVENTS_MAX = 1000;
const PROBLEM_STATES = new Set(["fatal", "unhealthy"]);
const LIVE_STATES = new Set(["starting", "running", "unhealthy", "stopping"]);
const FAILURE_KINDS = new Set([
  "instance.exited", "instance.fatal", "instance.unhealthy", "instance.restarting", "config.reload_failed",
]);

const state = {
  status: null,
  events: [],
  eventKeys: new Set(),
  eventsLoaded: false,
  unseenFailures: 0,
  view: "overview",
  logSource: null,
  mode: "call",
};

// --- small helpers ----------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setClass(node, className) {
  if (node.className !== className) node.className = className;
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
  if (d) return `${d}d ${h % 24}h`;
  if (h) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${m}m ${String(Math.floor(seconds % 60)).padStart(2, "0")}s`;
}

function fmtBytes(bytes) {
  if (!bytes) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function fmtAgo(epochSeconds) {
  if (!epochSeconds) return "";
  return `${fmtDuration(Math.max(0, Date.now() / 1000 - epochSeconds))} ago`;
}

function fmtClock(epochSeconds) {
  const date = new Date(epochSeconds * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const day = date.toDateString() === new Date().toDateString() ? "" : `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} `;
  return `${day}${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function instanceName(row) {
  return `${row.service}:${row.instance}`;
}

function rowKey(row) {
  return `${row.node}/${row.service}/${row.instance}`;
}

// --- API --------------------------------------------------------------------------------

async function api(path, body) {
  const options = { headers: { Authorization: `Bearer ${TOKEN}` }, cache: "no-store" };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    return { ok: false, error: `the supervisor did not answer (${error.message}); is it still running?` };
  }
  const text = await response.text();
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    data = { ok: false, error: text.trim() || `HTTP ${response.status}` };
  }
  if (!response.ok && data.ok === undefined) data.ok = false;
  data.httpStatus = response.status;
  return data;
}

function streamUrl(path, params = {}) {
  const query = new URLSearchParams({ ...params, token: TOKEN });
  return `${path}?${query}`;
}

// --- views and navigation ---------------------------------------------------------------

function showView(name) {
  if (!document.querySelector(`section.view[data-view="${name}"]`)) name = "overview";
  state.view = name;
  for (const section of document.querySelectorAll("section.view")) section.hidden = section.dataset.view !== name;
  for (const link of document.querySelectorAll(".tabs a")) link.classList.toggle("active", link.dataset.view === name);
  if (name === "events") {
    state.unseenFailures = 0;
    renderEventsBadge();
    if (!state.eventsLoaded) loadEvents();
  }
  if (name === "logs") startLogs();
  if (name === "console") $("route").focus();
}

function viewFromHash() {
  return (location.hash || "#overview").slice(1).split("/")[0];
}

// --- live stream ------------------------------------------------------------------------

function connect() {
  const source = new EventSource(streamUrl("api/stream"));
  const live = $("live");
  source.onopen = () => { live.dataset.state = "live"; setText($("live-text"), "live"); };
  source.onerror = () => { live.dataset.state = "down"; setText($("live-text"), "reconnecting…"); };
  source.addEventListener("status", (message) => {
    live.dataset.state = "live";
    setText($("live-text"), "live");
    state.status = JSON.parse(message.data);
    renderOverview();
    renderRouteOptions();
    renderLogTargets();
  });
  source.addEventListener("event", (message) => addEvent(JSON.parse(message.data), true));
}

function allInstances() {
  if (!state.status) return [];
  return state.status.nodes.flatMap((node) => node.instances);
}

// --- overview ---------------------------------------------------------------------------

const overview = { groups: new Map() };

function renderOverview() {
  const status = state.status;
  const rows = allInstances();
  renderCards(status, rows);
  renderAttention(rows);
  renderMissing(status);
  renderInstanceTable(status);
  $("instances-empty").hidden = rows.length > 0;
  if (!rows.length) setText($("instances-empty"), "No services on this node.");
}

function renderCards(status, rows) {
  const running = rows.filter((r) => r.state === "running").length;
  const problems = rows.filter((r) => PROBLEM_STATES.has(r.state)).length;
  const local = status.nodes.find((n) => n.node === status.local) || status.nodes[0];
  const services = new Set(rows.map((r) => `${r.node}/${r.service}`));
  const handled = rows.reduce((sum, r) => sum + (r.processed || 0), 0);
  const failed = rows.reduce((sum, r) => sum + (r.failed || 0), 0);
  const cards = [
    ["Nodes", String(status.nodes.length), status.missing.length ? `${status.missing.length} not answering` : "all answering", status.missing.length ? "bad" : ""],
    ["Services", String(services.size), `${rows.length} instances`, ""],
    ["Running", `${running}/${rows.length}`, running === rows.length ? "all up" : `${rows.length - running} not running`, running === rows.length && rows.length ? "good" : ""],
    ["Problems", String(problems), problems ? "fatal or unhealthy" : "none", problems ? "bad" : "good"],
    ["Handled", String(handled), `${failed} failed`, failed ? "" : ""],
    ["Supervisor", local ? `${local.cpu_percent.toFixed(1)}%` : "–", local ? `${fmtBytes(local.rss_bytes)} · pid ${local.pid}` : "", ""],
  ];
  const container = $("cards");
  if (container.children.length !== cards.length) {
    container.replaceChildren(...cards.map(() => el("div", { class: "card" },
      el("div", { class: "label" }), el("div", { class: "value" }), el("div", { class: "sub" }))));
  }
  cards.forEach(([label, value, sub, tone], i) => {
    const card = container.children[i];
    setClass(card, `card ${tone}`.trim());
    setText(card.children[0], label);
    setText(card.children[1], value);
    setText(card.children[2], sub);
  });
}

function exitText(row) {
  const parts = [];
  if (row.last_exit) parts.push(row.last_exit);
  if (row.last_exit_reason && row.last_exit_reason !== row.last_exit) parts.push(row.last_exit_reason);
  if (row.last_exit_at) parts.push(fmtAgo(row.last_exit_at));
  return parts.join(" · ");
}

function renderAttention(rows) {
  const bad = rows.filter((r) => PROBLEM_STATES.has(r.state));
  const box = $("attention");
  box.hidden = bad.length === 0;
  const signature = JSON.stringify(bad.map((r) => [rowKey(r), r.state, r.last_exit_reason, r.last_exit]));
  if (box.dataset.signature === signature) return;
  box.dataset.signature = signature;
  $("attention-list").replaceChildren(...bad.map((r) => el("li", {},
    el("span", { class: `state state-${r.state}`, text: r.state }),
    el("span", { class: "who", text: `${r.node} · ${instanceName(r)}` }),
    el("span", { class: "why", text: exitText(r) || (r.state === "unhealthy" ? "missed heartbeats" : "") }),
    el("button", { type: "button", class: "small", text: "Logs", onclick: () => openLogs(r) }),
    el("button", {
      type: "button", class: "small", text: r.state === "fatal" ? "Start" : "Restart",
      onclick: () => runAction(r.state === "fatal" ? "start" : "restart", r.node, { targets: [instanceName(r)] }),
    }),
  )));
}

function renderMissing(status) {
  const box = $("missing");
  const parts = status.missing.map((n) => `node ${n} did not answer the last status request`);
  for (const [node, error] of Object.entries(status.errors || {})) parts.push(`node ${node}: ${error}`);
  box.hidden = parts.length === 0;
  setText(box, parts.join(" · "));
}

function groupsOf(status) {
  const groups = [];
  // This node first, then the others by name.
  const rank = (node) => (node.node === status.local ? "" : node.node);
  const nodes = [...status.nodes].sort((a, b) => rank(a).localeCompare(rank(b)));
  for (const node of nodes) {
    for (const name of Object.keys(node.services).sort()) {
      const instances = node.instances.filter((r) => r.service === name).sort((a, b) => a.instance - b.instance);
      groups.push({ key: `${node.node}/${name}`, node: node.node, name, service: node.services[name], instances });
    }
  }
  return groups;
}

function renderInstanceTable(status) {
  const table = $("instances");
  const groups = groupsOf(status);
  const wanted = new Set(groups.map((g) => g.key));
  for (const [key, group] of overview.groups) {
    if (!wanted.has(key)) { group.tbody.remove(); overview.groups.delete(key); }
  }
  for (const data of groups) {
    let group = overview.groups.get(data.key);
    if (!group) { group = createGroup(data); overview.groups.set(data.key, group); }
    updateGroup(group, data);
    table.append(group.tbody); // moves it into order without recreating it
  }
}

function createGroup(data) {
  const target = () => ({ targets: [data.name] });
  const header = el("tr", { class: "service" });
  const title = el("td", { colspan: "13" },
    el("span", { class: "svc-name", text: data.name }),
    el("span", { class: "svc-meta" }),
    el("span", { class: "routes" }));
  const actions = el("td", { class: "actions" },
    el("button", { type: "button", text: "Start", onclick: () => runAction("start", data.node, target()) }),
    el("button", { type: "button", class: "warn-btn", text: "Restart", dataset: { action: "restart" }, onclick: () => runAction("restart", data.node, target()) }),
    el("button", { type: "button", class: "warn-btn", text: "Stop", onclick: () => runAction("stop", data.node, target()) }),
    el("button", { type: "button", text: "Scale", onclick: () => runScale(data.node, data.name, group.replicas) }));
  header.append(title, actions);
  const tbody = el("tbody", { dataset: { service: data.name, node: data.node } }, header);
  const group = { tbody, header, meta: title.children[1], routes: title.children[2], rows: new Map(), replicas: 0 };
  return group;
}

function updateGroup(group, data) {
  const running = data.instances.filter((r) => r.state === "running").length;
  group.replicas = data.service.replicas;
  setText(group.meta, `${data.node} · ${data.service.kind} · ${running}/${data.instances.length} running`);
  const routes = data.service.routes.filter((r) => r.kind === "route").map((r) => r.queue).sort();
  const signature = routes.join(" ");
  if (group.routes.dataset.signature !== signature) {
    group.routes.dataset.signature = signature;
    group.routes.replaceChildren(...routes.map((queue) => el("button", {
      type: "button", class: "chip", text: queue, title: "Try this route in the console",
      onclick: () => openConsole(queue),
    })));
  }
  const wanted = new Set(data.instances.map((r) => r.instance));
  for (const [index, row] of group.rows) {
    if (!wanted.has(index)) { row.tr.remove(); group.rows.delete(index); }
  }
  for (const r of data.instances) {
    let row = group.rows.get(r.instance);
    if (!row) { row = createRow(); group.rows.set(r.instance, row); }
    updateRow(row, r);
    group.tbody.append(row.tr);
  }
}

function createRow() {
  const cells = {};
  const names = ["node", "svc", "index", "state", "pid", "uptime", "restarts", "cpu", "mem", "hb", "lag", "handled", "exit"];
  const numeric = new Set(["index", "pid", "uptime", "restarts", "cpu", "mem", "hb", "lag", "handled"]);
  const tr = el("tr", { class: "instance" });
  for (const name of names) {
    cells[name] = el("td", { class: `c-${name}${numeric.has(name) ? " num" : ""}` });
    tr.append(cells[name]);
  }
  cells.stateBadge = el("span");
  cells.state.append(cells.stateBadge);
  const row = { tr, cells, data: null };
  const restart = el("button", { type: "button", class: "small warn-btn", text: "Restart", dataset: { action: "restart" }, onclick: () => runAction("restart", row.data.node, { targets: [instanceName(row.data)] }) });
  const stop = el("button", { type: "button", class: "small warn-btn", text: "Stop", dataset: { action: "stop" }, onclick: () => runAction("stop", row.data.node, { targets: [instanceName(row.data)] }) });
  const start = el("button", { type: "button", class: "small", text: "Start", dataset: { action: "start" }, onclick: () => runAction("start", row.data.node, { targets: [instanceName(row.data)] }) });
  const logs = el("button", { type: "button", class: "small", text: "Logs", dataset: { action: "logs" }, onclick: () => openLogs(row.data) });
  row.buttons = { restart, stop, start };
  tr.append(el("td", { class: "actions" }, start, restart, stop, logs));
  return row;
}

function updateRow(row, r) {
  const c = row.cells;
  row.data = r;
  row.tr.dataset.key = rowKey(r);
  row.tr.dataset.state = r.state;
  setClass(row.tr, `instance${PROBLEM_STATES.has(r.state) ? " problem" : ""}`);
  setText(c.node, r.node);
  setText(c.svc, r.service);
  setText(c.index, String(r.instance));
  setClass(c.stateBadge, `state state-${r.state}`);
  setText(c.stateBadge, r.state);

  setText(c.pid, r.pid ? String(r.pid) : "–");
  setText(c.uptime, fmtDuration(r.uptime_s));
  setText(c.restarts, String(r.restarts));
  setClass(c.restarts, `c-restarts num${r.restarts ? " warn" : ""}`);
  setText(c.cpu, r.cpu_percent != null ? `${r.cpu_percent.toFixed(1)}%` : "–");
  setText(c.mem, r.rss_bytes != null ? fmtBytes(r.rss_bytes) : "–");
  setText(c.hb, fmtDuration(r.heartbeat_age_s));
  setClass(c.hb, `c-hb num${r.heartbeat_age_s > 5 ? " warn" : ""}`);

  const lag = r.loop_lag_ms;
  setText(c.lag, lag === null || lag === undefined ? "–" : `${lag.toFixed(1)} ms`);
  setClass(c.lag, `c-lag num${lag > 1000 ? " bad" : lag > 100 ? " warn" : ""}`);
  setText(c.handled, r.processed === null || r.processed === undefined ? "–" : `${r.processed}${r.failed ? ` / ${r.failed} failed` : ""}`);

  const exit = exitText(r);
  setText(c.exit, exit || "–");
  c.exit.title = exit;
  const recent = r.last_exit_at && Date.now() / 1000 - r.last_exit_at < 300;
  setClass(c.exit, `c-exit${recent ? " recent" : ""}`);

  const live = LIVE_STATES.has(r.state);
  row.buttons.stop.hidden = !live;
  row.buttons.restart.hidden = !live;
  row.buttons.start.hidden = live;
}

// --- actions ----------------------------------------------------------------------------

function confirmDialog({ title, text, confirm, danger = true, input = null }) {
  const dialog = $("confirm");
  setText($("confirm-title"), title);
  setText($("confirm-text"), text);
  const ok = $("confirm-ok");
  ok.textContent = confirm;
  ok.className = danger ? "danger" : "primary";
  $("confirm-input-label").hidden = input === null;
  if (input !== null) $("confirm-input").value = String(input);
  return new Promise((resolve) => {
    const finish = (value) => {
      ok.onclick = null; $("confirm-cancel").onclick = null; dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    ok.onclick = () => finish(input === null ? true : $("confirm-input").value);
    $("confirm-cancel").onclick = () => finish(null);
    dialog.onclose = () => finish(null);
    dialog.showModal();
    (input === null ? ok : $("confirm-input")).focus();
  });
}

const ACTION_WORDS = {
  start: "Start", stop: "Stop", restart: "Restart",
};

async function runAction(action, node, { targets }) {
  const what = targets.join(", ");
  if (action !== "start") {
    const text = action === "stop"
      ? `Stop ${what} on node ${node}? Its instances stay stopped until someone starts them.`
      : `Restart ${what} on node ${node}? Instances of one service restart one at a time.`;
    const answer = await confirmDialog({ title: `${ACTION_WORDS[action]} ${what}?`, text, confirm: ACTION_WORDS[action] });
    if (!answer) return;
  }
  const pending = toast("pending", `${action} ${what}…`, `on node ${node}`, true);
  const result = await api("api/action", { action, node, targets });
  pending.remove();
  reportAction(`${action} ${what}`, node, result);
}

async function runScale(node, service, current) {
  const answer = await confirmDialog({
    title: `Scale ${service}`,
    text: `Number of instances of ${service} on node ${node} (now ${current}). Scaling down stops the highest-numbered instances.`,
    confirm: "Scale", danger: false, input: current,
  });
  if (answer === null) return;
  const replicas = Number(answer);
  if (!Number.isInteger(replicas) || replicas < 0) {
    toast("error", `scale ${service}`, `invalid instance count ${answer}: expected a whole number, 0 or more`, true);
    return;
  }
  if (replicas < current) {
    const sure = await confirmDialog({
      title: `Scale ${service} down to ${replicas}?`,
      text: `This stops ${current - replicas} instance(s) of ${service} on node ${node}.`,
      confirm: "Scale down",
    });
    if (!sure) return;
  }
  const pending = toast("pending", `scale ${service} to ${replicas}…`, `on node ${node}`, true);
  const result = await api("api/action", { action: "scale", node, service, replicas });
  pending.remove();
  reportAction(`scale ${service}`, node, result);
}

function describeResult(result) {
  if (!result) return "";
  if (result.replicas !== undefined) return `${result.replicas_before} → ${result.replicas} instances`;
  const lines = (result.instances || []).map((i) => `${i.service}:${i.instance} ${i.state}${i.pid ? ` (pid ${i.pid})` : ""}`);
  if (result.pending && result.pending.length) lines.push(`not settled yet: ${result.pending.join(", ")}`);
  return lines.join("\n");
}

function reportAction(title, node, response) {
  if (response.ok) toast("ok", `${title}: done`, `node ${node}\n${describeResult(response.result)}`);
  else toast("error", `${title}: failed`, response.error, true);
}

function toast(kind, title, text, sticky = false) {
  const item = el("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" },
    el("div", { class: "t-title", text: title }),
    el("button", { type: "button", class: "t-close", text: "×", title: "Dismiss", onclick: () => item.remove() }),
    el("div", { class: "t-text", text: text || "" }));
  $("toasts").append(item);
  if (!sticky) setTimeout(() => item.remove(), 8000);
  return item;
}

// --- console ----------------------------------------------------------------------------

function knownRoutes() {
  const routes = new Map();
  for (const node of state.status ? state.status.nodes : []) {
    for (const service of Object.values(node.services)) {
      for (const route of service.routes) {
        if (route.kind === "route") routes.set(route.queue, route.service);
      }
    }
  }
  return [...routes.entries()].sort((a, b) => a[0].localeCompare(b[0]));
}

function renderRouteOptions() {
  const routes = knownRoutes();
  const signature = routes.map((r) => r[0]).join(" ");
  const chips = $("route-chips");
  if (chips.dataset.signature === signature) return;
  chips.dataset.signature = signature;
  $("route-options").replaceChildren(...routes.map(([queue]) => el("option", { value: queue })));
  const byService = new Map();
  for (const [queue, service] of routes) {
    if (!byService.has(service)) byService.set(service, []);
    byService.get(service).push(queue);
  }
  const parts = [];
  for (const [service, queues] of byService) {
    parts.push(el("span", { class: "group", text: service }));
    parts.push(...queues.map((queue) => el("button", { type: "button", class: "chip", text: queue.slice(service.length + 1) || queue, title: queue, onclick: () => { $("route").value = queue; $("body").focus(); } })));
  }
  chips.replaceChildren(...parts);
}

function parseBody(text) {
  if (text.trim() === "") return { body: null, kind: "empty: sent as null" };
  try {
    return { body: JSON.parse(text), kind: "JSON" };
  } catch {
    return { body: text, kind: "text: not valid JSON, sent as a string" };
  }
}

function setMode(mode) {
  state.mode = mode;
  for (const button of document.querySelectorAll(".segmented .seg")) {
    button.setAttribute("aria-pressed", String(button.dataset.mode === mode));
  }
  $("console-submit").textContent = mode === "call" ? "Call" : "Send";
  $("timeout").disabled = mode !== "call";
}

function openConsole(route) {
  $("route").value = route;
  location.hash = "#console";
}

async function submitConsole() {
  const route = $("route").value.trim();
  if (!route) { $("route").focus(); return; }
  const text = $("body").value;
  const { body } = parseBody(text);
  const timeout_s = Number($("timeout").value) || 10;
  const button = $("console-submit");
  button.disabled = true;
  showResultPending(route);
  const result = state.mode === "call"
    ? await api("api/call", { route, body, timeout_s })
    : await api("api/send", { route, body });
  button.disabled = false;
  showResult(route, state.mode, result);
  remember({ route, mode: state.mode, text, timeout_s, at: Date.now(), ok: !!result.ok, summary: summarize(result), rtt: result.rtt_ms });
}

function showResultPending(route) {
  $("result-head").replaceChildren(el("span", { class: "badge info", text: "waiting" }), el("span", { class: "route", text: route }));
  $("result-body").replaceChildren();
}

function summarize(result) {
  if (result.ok) return result.sent ? "sent" : "reply";
  if (result.error && typeof result.error === "object") return result.error.type;
  return "error";
}

function showResult(route, mode, result) {
  const head = $("result-head");
  const body = $("result-body");
  let badge;
  if (result.ok && mode === "send") badge = el("span", { class: "badge info", text: "sent" });
  else if (result.ok) badge = el("span", { class: "badge ok", text: "reply" });
  else if (result.error && typeof result.error === "object") {
    const tone = result.error.type === "RemoteError" ? "err" : "warn";
    badge = el("span", { class: `badge ${tone}`, text: result.error.type });
  } else badge = el("span", { class: "badge err", text: `error ${result.httpStatus || ""}`.trim() });
  head.replaceChildren(badge, el("span", { class: "route", text: route }),
    result.rtt_ms !== undefined ? el("span", { class: "rtt", text: `${result.rtt_ms.toFixed(1)} ms` }) : null);
  if (result.ok && mode === "send") {
    body.replaceChildren(el("span", { class: "muted", text: "Published; a send does not wait for a reply." }));
  } else if (result.ok) {
    body.replaceChildren(JSON.stringify(result.reply, null, 2));
  } else if (result.error && typeof result.error === "object") {
    const e = result.error;
    const parts = [el("div", { class: "message", text: e.message })];
    if (e.remote_type) parts.push(el("div", { text: `\nremote exception: ${e.remote_type}: ${e.remote_message}` }));
    if (e.errors && e.errors.length) parts.push(el("div", { text: `\n${JSON.stringify(e.errors, null, 2)}` }));
    body.replaceChildren(...parts);
  } else {
    body.replaceChildren(el("div", { class: "message", text: result.error || "request failed" }));
  }
}

function loadHistory() {
  try {
    const items = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch {
    return [];
  }
}

function remember(entry) {
  const items = [entry, ...loadHistory()].slice(0, HISTORY_MAX);
  localStorage.setItem(HISTORY_KEY, JSON.stringify(items));
  renderHistory();
}

function loadEntry(entry) {
  $("route").value = entry.route;
  $("body").value = entry.text;
  $("timeout").value = String(entry.timeout_s || 10);
  setMode(entry.mode || "call");
  updateBodyKind();
}

function renderHistory() {
  const items = loadHistory();
  $("history-empty").hidden = items.length > 0;
  $("history").replaceChildren(...items.map((entry) => el("li", { onclick: () => loadEntry(entry), title: entry.text },
    el("span", { class: "h-route", text: `${entry.mode === "send" ? "send" : "call"} ${entry.route}` }),
    el("span", { class: "h-meta", text: `${new Date(entry.at).toLocaleTimeString()} · ${entry.summary}${entry.rtt !== undefined && entry.rtt !== null ? ` · ${entry.rtt.toFixed(1)} ms` : ""}` }),
    el("button", { type: "button", class: "small h-replay", text: "↻", title: "Replay", onclick: (event) => { event.stopPropagation(); loadEntry(entry); submitConsole(); } }),
  )));
}

function updateBodyKind() {
  setText($("body-kind"), parseBody($("body").value).kind);
}

// --- logs -------------------------------------------------------------------------------

const logs = { target: null, lines: [] };

function renderLogTargets() {
  const select = $("log-target");
  const rows = allInstances();
  const values = rows.map((r) => `${r.node}|${instanceName(r)}`);
  if (select.dataset.signature !== values.join(" ")) {
    select.dataset.signature = values.join(" ");
    const current = select.value;
    select.replaceChildren(...rows.map((r) => el("option", { value: `${r.node}|${instanceName(r)}`, text: `${instanceName(r)}  ·  ${r.node}` })));
    if (values.includes(current)) select.value = current;
    else if (logs.target && values.includes(logs.target)) select.value = logs.target;
  }
  if (state.view === "logs" && !state.logSource && select.value) startLogs();
}

function openLogs(row) {
  logs.target = `${row.node}|${instanceName(row)}`;
  renderLogTargets();
  $("log-target").value = logs.target;
  stopLogs();
  location.hash = "#logs";
  if (state.view === "logs") startLogs();
}

function stopLogs() {
  if (state.logSource) { state.logSource.close(); state.logSource = null; }
}

function startLogs() {
  const value = $("log-target").value;
  if (!value) { setText($("log-status"), "no instance to show yet"); return; }
  if (state.logSource && logs.target === value) return;
  stopLogs();
  logs.target = value;
  const [node, target] = value.split("|");
  logs.lines = [];
  $("log").replaceChildren();
  setText($("log-status"), `connecting to ${target}…`);
  const source = new EventSource(streamUrl("api/logs", { node, target, lines: "200" }));
  state.logSource = source;
  source.addEventListener("lines", (message) => {
    const data = JSON.parse(message.data);
    if (data.reset) { logs.lines = []; $("log").replaceChildren(); }
    appendLogLines(data.lines);
    setText($("log-status"), `${target} on ${node} · following · ${logs.lines.length} lines`);
  });
  source.addEventListener("error", (message) => {
    if (message.data) setText($("log-status"), JSON.parse(message.data).error);
    else setText($("log-status"), `${target}: connection lost, retrying…`);
  });
}

function logClass(line) {
  if (/\b(ERROR|CRITICAL)\b|Traceback|Error:/.test(line)) return "l-err";
  if (/\bWARNING\b/.test(line)) return "l-warn";
  return "l-info";
}

function appendLogLines(lines) {
  const pre = $("log");
  const follow = $("log-follow").checked;
  const filter = $("log-filter").value;
  const fragment = document.createDocumentFragment();
  for (const line of lines) {
    logs.lines.push(line);
    const node = el("div", { class: logClass(line), text: line });
    if (filter && !line.includes(filter)) node.hidden = true;
    fragment.append(node);
  }
  pre.append(fragment);
  while (logs.lines.length > LOG_MAX_LINES) { logs.lines.shift(); pre.firstChild.remove(); }
  if (follow) pre.scrollTop = pre.scrollHeight;
}

function applyLogFilter() {
  const filter = $("log-filter").value;
  for (const line of $("log").children) line.hidden = !!filter && !line.textContent.includes(filter);
}

// --- events -----------------------------------------------------------------------------

function eventKey(event) {
  return `${event.node}|${event.kind}|${event.service}|${event.instance}|${Math.round(event.time * 1000)}`;
}

async function loadEvents() {
  state.eventsLoaded = true;
  const result = await api("api/events?limit=300");
  if (!result.events) {
    setText($("events-empty"), `Events could not be loaded: ${result.error}`);
    state.eventsLoaded = false;
    return;
  }
  for (const event of result.events) addEvent(event, false);
  renderEvents();
}

function addEvent(event, live) {
  const key = eventKey(event);
  if (state.eventKeys.has(key)) return;
  state.eventKeys.add(key);
  event.fresh = live;
  state.events.push(event);
  state.events.sort((a, b) => a.time - b.time);
  if (state.events.length > EVENTS_MAX) state.eventKeys.delete(eventKey(state.events.shift()));
  if (live && isFailure(event) && state.view !== "events") {
    state.unseenFailures += 1;
    renderEventsBadge();
  }
  if (state.eventsLoaded || state.view === "events") renderEvents();
}

function renderEventsBadge() {
  const badge = $("events-badge");
  badge.hidden = state.unseenFailures === 0;
  setText(badge, String(state.unseenFailures));
}

// An exit that an operator asked for (stop or restart) is no failure.
function isRequestedExit(event) {
  return event.kind === "instance.exited" && !!event.data && ["stop", "restart"].includes(event.data.cause);
}

function isFailure(event) {
  return FAILURE_KINDS.has(event.kind) && !isRequestedExit(event);
}

function kindTone(event) {
  const kind = event.kind;
  if (isRequestedExit(event)) return "kind-info";
  if (kind === "instance.running" || kind === "node.started" || kind === "config.reloaded") return "kind-good";
  if (kind === "instance.fatal" || kind === "instance.unhealthy" || kind === "config.reload_failed") return "kind-bad";
  if (kind === "instance.exited" || kind === "instance.restarting" || kind === "node.stopping") return "kind-warn";
  return "kind-info";
}

function renderEvents() {
  const service = $("event-service").value;
  const problemsOnly = $("event-problems").checked;
  const services = [...new Set(state.events.map((e) => e.service).filter(Boolean))].sort();
  const select = $("event-service");
  if (select.dataset.signature !== services.join(" ")) {
    select.dataset.signature = services.join(" ");
    select.replaceChildren(el("option", { value: "", text: "all services" }), ...services.map((s) => el("option", { value: s, text: s })));
    select.value = services.includes(service) ? service : "";
  }
  const shown = state.events
    .filter((e) => (!service || e.service === service) && (!problemsOnly || isFailure(e)))
    .slice(-500)
    .reverse();
  $("events-body").replaceChildren(...shown.map(eventRow));
  for (const event of shown) event.fresh = false;
  $("events-empty").hidden = shown.length > 0;
  setText($("events-empty"), "No events match.");
  setText($("event-count"), `${shown.length} of ${state.events.length} events`);
}

function eventRow(event) {
  const details = Object.entries(event.data || {}).map(([key, value]) => el("span", {},
    `${key}=`, el("b", { text: typeof value === "object" ? JSON.stringify(value) : String(value) }), "  "));
  let who = event.service || "–";
  if (event.service && event.instance !== null && event.instance !== undefined) who = `${event.service}:${event.instance}`;
  return el("tr", { class: event.fresh ? "fresh" : "", dataset: { kind: event.kind } },
    el("td", { class: "mono", text: fmtClock(event.time), title: new Date(event.time * 1000).toString() }),
    el("td", { class: "muted", text: event.node }),
    el("td", {}, el("span", { class: `kind ${kindTone(event)}`, text: event.kind })),
    el("td", { class: "mono", text: who }),
    el("td", { class: "details" }, details));
}

// --- start ------------------------------------------------------------------------------

function cleanUrl() {
  // The token is in the cookie and in this page now; keep it out of the address bar.
  if (location.search.includes("token=")) history.replaceState(null, "", location.pathname + location.hash);
}

function wire() {
  window.addEventListener("hashchange", () => showView(viewFromHash()));
  for (const button of document.querySelectorAll(".segmented .seg")) button.addEventListener("click", () => setMode(button.dataset.mode));
  $("console-submit").addEventListener("click", submitConsole);
  $("body").addEventListener("input", updateBodyKind);
  for (const id of ["body", "route"]) {
    $(id).addEventListener("keydown", (event) => {
      if ((event.ctrlKey || event.metaKey) && event.key === "Enter") { event.preventDefault(); submitConsole(); }
    });
  }
  $("history-clear").addEventListener("click", () => { localStorage.removeItem(HISTORY_KEY); renderHistory(); });
  $("log-target").addEventListener("change", () => { stopLogs(); startLogs(); });
  $("log-filter").addEventListener("input", applyLogFilter);
  $("log-wrap").addEventListener("change", () => $("log").classList.toggle("wrap", $("log-wrap").checked));
  $("log-clear").addEventListener("click", () => { logs.lines = []; $("log").replaceChildren(); });
  $("event-service").addEventListener("change", renderEvents);
  $("event-problems").addEventListener("change", renderEvents);
}

cleanUrl();
wire();
setMode("call");
updateBodyKind();
renderHistory();
showView(viewFromHash());
connect();
