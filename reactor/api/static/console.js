// The Deploy Reactor console: the release list and a live release page, over the HTTP API only.
// Every request carries the bearer token the user gave (kept in sessionStorage, never in a URL). The release page
// follows the API's Server-Sent Events stream with fetch, because EventSource cannot send an Authorization header.

const TOKEN_KEY = "reactor.token";
const LIST_REFRESH_MS = 3000;
const RETRY_MS = 2000;
const TIMELINE_SHOWN = 300;
const PROGRESS = [
  "queued",
  "dispatched",
  "succeeded",
  "failed",
  "rollback_dispatched",
  "rolled_back",
  "rollback_failed",
];
// How far along a node is; its progress never goes back within a release, so a late snapshot cannot undo an event.
const RANK = {
  queued: 0,
  dispatched: 1,
  succeeded: 2,
  failed: 2,
  rollback_dispatched: 3,
  rolled_back: 4,
  rollback_failed: 4,
};
// What each node event says about the node's progress in its release.
const NODE_PROGRESS = {
  DeployRequested: "dispatched",
  NodeDeployed: "succeeded",
  NodeFailed: "failed",
  RollbackRequested: "rollback_dispatched",
  NodeRolledBack: "rolled_back",
  RollbackFailed: "rollback_failed",
};
// What a release event says about the release's state (a snapshot reloaded after it confirms or corrects it).
const RELEASE_STATE = {
  BatchStarted: "running",
  ReleaseAwaitingApproval: "awaiting_approval",
  ReleaseCompleted: "completed",
  ReleaseRolledBack: "rolled_back",
};
const COMMANDS = ["approve", "pause", "resume", "abort", "rollback"];
// In which release states each command makes sense (the API accepts them all; the pacer decides).
const ENABLED = {
  approve: ["awaiting_approval"],
  pause: ["running", "waiting", "awaiting_approval", "queued"],
  resume: ["paused"],
  abort: ["queued", "running", "paused", "waiting", "awaiting_approval"],
  rollback: ["running", "paused", "waiting", "awaiting_approval", "completed", "halted", "aborted"],
};
const CONFIRM = { abort: true, rollback: true };
const HUMAN_EVENTS = new Set([
  "ReleaseRequested",
  "ReleaseApproved",
  "ReleasePaused",
  "ReleaseResumed",
  "ReleaseAborted",
  "ReleaseRollbackRequested",
]);

const session = { who: null };

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  return headers;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers), cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// An element with attributes (`text` sets its text, `class` its class, `data-*` and others as attributes).
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") element.textContent = value;
    else if (name === "class") element.className = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function notice(text, kind = "info") {
  const element = document.getElementById("notice");
  element.textContent = text;
  element.className = `notice ${kind}`;
  element.hidden = !text;
}

function when(iso) {
  if (!iso) return "";
  const time = new Date(iso);
  return Number.isNaN(time.getTime()) ? iso : time.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function shortTime(iso) {
  const full = when(iso);
  return full.slice(11, 19) || full;
}

function badge(state) {
  return h("span", { class: `badge state-${state}`, "data-state": state, text: state.replaceAll("_", " ") });
}

function progressBar(progress, total) {
  const bar = h("div", { class: "bar", role: "img", "aria-label": summaryOf(progress, total) });
  for (const state of PROGRESS) {
    const count = progress[state] || 0;
    if (!count || !total) continue;
    const segment = h("span", { class: `seg p-${state}`, title: `${count} ${state}` });
    segment.style.width = `${(100 * count) / total}%`;
    bar.append(segment);
  }
  return bar;
}

function summaryOf(progress, total) {
  const parts = PROGRESS.filter((state) => progress[state]).map((s) => `${progress[s]} ${s.replaceAll("_", " ")}`);
  return `${parts.join(", ") || "no nodes"} of ${total}`;
}

function totalOf(progress) {
  return PROGRESS.reduce((sum, state) => sum + (progress[state] || 0), 0);
}

// --- who is asking -------------------------------------------------------------------------------------------

async function identify() {
  const who = document.getElementById("who");
  try {
    session.who = await api("/api/v1/whoami");
    who.textContent = `${session.who.identity}${session.who.read_only ? " · read-only" : ""}`;
    who.dataset.readOnly = String(session.who.read_only);
    return true;
  } catch (error) {
    session.who = null;
    who.textContent = "";
    if (error.status === 401) {
      notice(token() ? "That token is not known to this server." : "This server needs a token: enter it above.", "error");
      document.getElementById("token").focus();
    } else {
      notice(`The API does not answer: ${error.message}`, "error");
    }
    return false;
  }
}

function tokenForm(start) {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    start();
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    start();
  });
}

// --- the release list ----------------------------------------------------------------------------------------

async function showList(main, signal) {
  document.title = "Releases · Deploy Reactor";
  const body = h("tbody");
  const table = h(
    "table",
    { class: "releases", id: "releases" },
    h(
      "thead",
      {},
      h("tr", {}, ["Release", "Service", "Version", "State", "Progress", "Batch", "By", "Updated"].map((t) => h("th", { text: t }))),
    ),
    body,
  );
  const empty = h("p", { class: "empty", text: "No releases yet.", hidden: true });
  main.replaceChildren(h("h1", { text: "Releases" }), table, empty);
  while (!signal.aborted) {
    try {
      const { releases } = await api("/api/v1/releases");
      body.replaceChildren(
        ...releases.map((release) => {
          const total = totalOf(release.progress);
          const done = release.progress.succeeded || 0;
          return h(
            "tr",
            { "data-release": release.release_id },
            h("td", {}, h("a", { href: `/releases/${encodeURIComponent(release.release_id)}`, text: release.release_id })),
            h("td", { text: release.service }),
            h("td", { text: release.version }),
            h("td", {}, badge(release.state)),
            h("td", {}, h("div", { class: "progress" }, progressBar(release.progress, total), h("span", { text: `${done}/${total}` }))),
            h("td", { text: `${Math.min(release.batch, release.batch_count)}/${release.batch_count}` }),
            h("td", { text: release.actor || "" }),
            h("td", { text: when(release.updated_at) }),
          );
        }),
      );
      empty.hidden = releases.length > 0;
      table.dataset.loaded = "true";
    } catch (error) {
      notice(`Releases could not be read: ${error.message}`, "error");
      if (error.status === 401) return;
    }
    await pause(LIST_REFRESH_MS, signal);
  }
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

// --- one release -------------------------------------------------------------------------------------------------

class ReleasePage {
  constructor(main, releaseId, signal) {
    this.main = main;
    this.releaseId = releaseId;
    this.signal = signal;
    this.release = null;
    this.events = [];
    this.eventIds = new Set();
    this.progress = new Map();
    this.openNode = null;
    this.loading = null;
    this.again = false;
    this.settle = null;
    this.bar = null;
    this.rendering = null;
  }

  get path() {
    return `/api/v1/releases/${encodeURIComponent(this.releaseId)}`;
  }

  async start() {
    document.title = `${this.releaseId} · Deploy Reactor`;
    this.main.replaceChildren(h("p", { class: "empty", text: `Loading ${this.releaseId}…` }));
    try {
      await this.load();
    } catch (error) {
      const text = error.status === 404 ? `No release ${this.releaseId} (yet).` : error.message;
      this.main.replaceChildren(h("p", { class: "empty", text }));
      if (error.status === 404) setTimeout(() => !this.signal.aborted && this.start(), RETRY_MS);
      return;
    }
    this.follow();
  }

  async load() {
    const release = await api(this.path, { signal: this.signal });
    this.release = release;
    for (const event of release.events) this.addEvent(event);
    for (const node of release.nodes) this.setProgress(node.node_key, node.progress);
    this.render();
  }

  // Reload the release at most every half second while events come, and once more when they stop.
  refresh() {
    clearTimeout(this.settle);
    this.settle = setTimeout(() => this.reload(), 1500);
    if (this.loading) {
      this.again = true;
      return;
    }
    this.loading = setTimeout(async () => {
      await this.reload();
      this.loading = null;
      if (this.again) {
        this.again = false;
        this.refresh();
      }
    }, 500);
  }

  async reload() {
    if (this.signal.aborted) return;
    try {
      await this.load();
    } catch (error) {
      if (error.name !== "AbortError") notice(`The release could not be read: ${error.message}`, "error");
    }
  }

  setProgress(nodeKey, progress) {
    const known = this.progress.get(nodeKey);
    if (known === undefined || RANK[progress] >= RANK[known]) this.progress.set(nodeKey, progress);
  }

  addEvent(event) {
    if (event.event_id && this.eventIds.has(event.event_id)) return false;
    if (event.event_id) this.eventIds.add(event.event_id);
    this.events.push(event);
    const progress = NODE_PROGRESS[event.event_type];
    if (progress && this.progress.has(event.subject)) this.setProgress(event.subject, progress);
    return true;
  }

  // The release's events, live: fetch's streaming body parsed as Server-Sent Events, resumed with Last-Event-ID.
  async follow() {
    const live = document.getElementById("live");
    while (!this.signal.aborted) {
      const last = this.events.length ? this.events[this.events.length - 1].event_id : null;
      try {
        const headers = authHeaders({ Accept: "text/event-stream", ...(last ? { "Last-Event-ID": last } : {}) });
        const response = await fetch(`${this.path}/events`, { headers, cache: "no-store", signal: this.signal });
        if (!response.ok) throw new ApiError(response.status, null);
        this.setLive(true);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        let data = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, end).replace(/\r$/, "");
            buffer = buffer.slice(end + 1);
            if (line === "") {
              if (data) this.onEvent(JSON.parse(data));
              data = "";
            } else if (line.startsWith("data:")) {
              data += line.slice(line.startsWith("data: ") ? 6 : 5);
            }
          }
        }
      } catch (error) {
        if (this.signal.aborted || error.name === "AbortError") return;
        if (error.status === 401) return;
      }
      this.setLive(false);
      await pause(RETRY_MS, this.signal);
    }
    if (live) this.setLive(false);
  }

  setLive(on) {
    const live = document.getElementById("live");
    if (!live) return;
    live.dataset.live = String(on);
    live.textContent = on ? "live" : "reconnecting…";
  }

  onEvent(event) {
    if (!this.addEvent(event)) return;
    if (RELEASE_STATE[event.event_type] && this.release) this.release.state = RELEASE_STATE[event.event_type];
    const data = (event.cloudevent && event.cloudevent.data) || {};
    // The event counts batches from 0; the API and the page from 1.
    if (event.event_type === "BatchStarted" && this.release && Number.isInteger(data.batch)) this.release.batch = data.batch + 1;
    this.scheduleRender();
    // A node's event carries its new progress: the page need not reload the release (with its whole timeline) for
    // it, except to show the open drawer's node record. Release events change counters and state: reload for them.
    if (!(event.event_type in NODE_PROGRESS) || event.subject === this.openNode) this.refresh();
  }

  // One render for a burst of events.
  scheduleRender() {
    if (this.rendering) return;
    this.rendering = setTimeout(() => {
      this.rendering = null;
      this.render();
    }, 100);
  }

  async command(action) {
    const reason = document.getElementById("reason").value.trim();
    if (CONFIRM[action] && !window.confirm(`${action} release ${this.releaseId}?`)) return;
    try {
      const accepted = await api(`${this.path}/${action}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(reason ? { reason } : {}),
      });
      notice(`${action}: sent as ${accepted.actor}.`, "ok");
      document.getElementById("reason").value = "";
    } catch (error) {
      notice(`${action} refused (${error.status}): ${error.message}`, "error");
    }
    this.refresh();
  }

  render() {
    const release = this.release;
    if (!release) return;
    const live = document.getElementById("live");
    const liveState = live ? live.dataset.live : "false";
    const nodes = release.nodes.map((node) => ({ ...node, progress: this.progress.get(node.node_key) || node.progress }));
    const counts = Object.fromEntries(PROGRESS.map((state) => [state, 0]));
    for (const node of nodes) counts[node.progress] += 1;
    // Moving the kept command bar out and back in takes the focus from its reason field: give it back, with the
    // caret where it was, or the keys typed next would go to the page and the reason would be lost.
    const focused = document.activeElement;
    const caret = focused && focused.id === "reason" ? [focused.selectionStart, focused.selectionEnd] : null;
    this.main.replaceChildren(
      this.header(release, liveState),
      this.controls(release),
      h("section", { class: "columns" }, h("div", { class: "grid-column" }, this.figures(release, counts, nodes.length), this.grid(release, nodes)), this.timeline()),
    );
    if (caret && document.activeElement !== focused && focused.isConnected) {
      focused.focus();
      focused.setSelectionRange(...caret);
    }
    if (this.openNode) this.drawer(this.openNode);
  }

  header(release, liveState) {
    return h(
      "div",
      { class: "release-head" },
      h("a", { href: "/", class: "back", text: "← Releases" }),
      h("h1", { text: release.release_id }),
      h("span", { id: "release-state" }, badge(release.state)),
      h("span", { class: "what", text: `${release.service} ${release.version}` }),
      h("span", { class: "what", text: `batch ${Math.min(release.batch, release.batch_count)} of ${release.batch_count}` }),
      release.actor ? h("span", { class: "what", text: `by ${release.actor}` }) : null,
      h("span", { id: "live", class: "live", "data-live": liveState, text: liveState === "true" ? "live" : "connecting…" }),
      release.reason ? h("p", { class: "reason", id: "release-reason", text: release.reason }) : null,
    );
  }

  // Made once and kept across renders, so a reason being typed survives live updates.
  controls(release) {
    if (!session.who || session.who.read_only) {
      return h("p", { class: "read-only", id: "read-only", text: "Read-only: commands are hidden for this token." });
    }
    this.bar = this.bar || this.commandBar();
    for (const button of this.bar.querySelectorAll("button[data-action]")) {
      button.disabled = !ENABLED[button.dataset.action].includes(release.state);
    }
    return this.bar;
  }

  commandBar() {
    return h(
      "div",
      { class: "controls", id: "controls" },
      ...COMMANDS.map((action) =>
        h("button", {
          type: "button",
          class: `command cmd-${action}`,
          "data-action": action,
          text: action,
          onclick: () => this.command(action),
        }),
      ),
      h("input", { id: "reason", type: "text", placeholder: "reason (for the audit trail)", maxlength: "4000" }),
    );
  }

  figures(release, counts, total) {
    const spent = counts.failed;
    const budget = release.failure_budget;
    const left = Math.max(budget - spent, 0);
    const over = spent > budget;
    return h(
      "div",
      { class: "figures" },
      h(
        "div",
        { class: `budget${over ? " over" : ""}`, id: "budget", "data-spent": String(spent), "data-left": String(left) },
        h("span", { class: "label", text: `failure budget: ${budget} failed node${budget === 1 ? "" : "s"}${release.batch_failure_budget !== null ? ` (per batch ${release.batch_failure_budget})` : ""}` }),
        h("strong", { text: `${spent} spent · ${left} left` }),
        over ? h("span", { class: "label", text: "spent: nothing more is dispatched" }) : null,
      ),
      h("div", { class: "legend" }, PROGRESS.filter((state) => counts[state]).map((state) => h("span", { class: `key p-${state}`, text: `${counts[state]} ${state.replaceAll("_", " ")}` }))),
      h("div", { class: "overall" }, progressBar(counts, total)),
    );
  }

  grid(release, nodes) {
    const strategy = release.plan.strategy || {};
    const gates = new Set(strategy.approval_after_batches || []);
    const sections = release.batches.map((batch) => {
      const members = nodes.filter((node) => node.batch === batch.batch);
      const gate = strategy.approval_every_batch || gates.has(batch.batch);
      const current = batch.batch === release.batch;
      return h(
        "section",
        { class: `batch${current ? " current" : ""}`, "data-batch": String(batch.batch) },
        h("h2", {}, `Batch ${batch.batch}`, h("span", { class: "label", text: ` ${members.length || batch.size} node${batch.size === 1 ? "" : "s"}` })),
        h(
          "div",
          { class: "nodes" },
          members.map((node) =>
            h("button", {
              type: "button",
              class: `node p-${node.progress}${this.openNode === node.node_key ? " open" : ""}`,
              "data-node": node.node_key,
              "data-progress": node.progress,
              title: `${node.node_key}: ${node.progress.replaceAll("_", " ")}`,
              text: nodeName(node.node_key),
              onclick: () => this.drawer(node.node_key),
            }),
          ),
        ),
        gate ? h("p", { class: "gate", text: "approval gate after this batch" }) : null,
      );
    });
    return h("div", { class: "batches", id: "batches" }, sections);
  }

  timeline() {
    const rows = this.events.slice(-TIMELINE_SHOWN).reverse().map((event) =>
      h(
        "li",
        { class: HUMAN_EVENTS.has(event.event_type) ? "human" : "", "data-type": event.event_type },
        h("time", { datetime: event.time, title: when(event.time), text: shortTime(event.time) }),
        h("span", { class: "type", text: event.event_type }),
        h("span", { class: "actor", title: event.actor, text: event.actor }),
        h("span", { class: "summary", text: event.summary }),
      ),
    );
    return h(
      "section",
      { class: "timeline" },
      h("h2", { text: "Audit timeline" }),
      h("ol", { id: "timeline" }, rows.length ? rows : h("li", { class: "empty", text: "No events seen by this server." })),
    );
  }

  drawer(nodeKey) {
    this.openNode = nodeKey;
    const aside = document.getElementById("drawer");
    const member = this.release.nodes.find((node) => node.node_key === nodeKey);
    if (!member) return;
    const status = member.status || {};
    const progress = this.progress.get(nodeKey) || member.progress;
    const history = this.events.filter((event) => event.subject === nodeKey);
    const failure = [...history].reverse().find((event) => event.event_type === "NodeFailed" || event.event_type === "RollbackFailed");
    const failureData = failure ? failure.cloudevent.data || {} : {};
    const lastError = status.last_error || failureData.error || "";
    const step = failureData.step || stepOf(lastError);
    const close = () => {
      this.openNode = null;
      aside.hidden = true;
      for (const tile of document.querySelectorAll(".node.open")) tile.classList.remove("open");
    };
    aside.replaceChildren(
      h("button", { type: "button", class: "close", "aria-label": "close", text: "×", onclick: close }),
      h("h2", { text: nodeKey }),
      h(
        "dl",
        {},
        field("progress", progress),
        field("node state", status.state),
        field("batch", String(member.batch)),
        field("operation", status.operation),
        field("current version", status.current_version),
        field("previous version", status.prev_version),
        field("deploying version", status.deploying_version),
        field("updated", when(status.updated_at)),
      ),
      h("h3", { text: "Last error" }),
      lastError
        ? h("div", { class: "error", id: "node-error" }, step ? h("span", { class: "step", id: "node-step", text: step }) : null, h("pre", { text: lastError }))
        : h("p", { class: "label", id: "node-error", text: "none" }),
      h("h3", { text: "Version history in this release" }),
      h(
        "ol",
        { class: "history", id: "node-history" },
        history.length
          ? history.map((event) => h("li", {}, h("time", { text: shortTime(event.time) }), h("span", { class: "type", text: event.event_type }), h("span", { text: versionsOf(event) })))
          : h("li", { class: "label", text: "no events yet" }),
      ),
    );
    aside.hidden = false;
    aside.dataset.node = nodeKey;
    for (const tile of document.querySelectorAll(".node")) tile.classList.toggle("open", tile.dataset.node === nodeKey);
  }
}

function field(name, value) {
  return [h("dt", { text: name }), h("dd", { text: value || "—" })];
}

function nodeName(nodeKey) {
  const parts = nodeKey.split("/");
  return parts.length > 2 ? parts[1] : parts[parts.length - 1];
}

function stepOf(error) {
  const match = /^([a-z][a-z0-9_-]{0,31}): /.exec(error);
  return match ? match[1] : "";
}

function versionsOf(event) {
  const data = (event.cloudevent && event.cloudevent.data) || {};
  const parts = [];
  if (data.from_version) parts.push(`${data.from_version} →`);
  if (data.version) parts.push(data.version);
  if (data.target_version) parts.push(`→ ${data.target_version}`);
  if (data.prev_version) parts.push(`(previous ${data.prev_version})`);
  if (data.step) parts.push(`at ${data.step}`);
  return parts.join(" ");
}

// --- start -------------------------------------------------------------------------------------------------------

let current = null;

async function start() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  notice("");
  document.getElementById("drawer").hidden = true;
  const main = document.getElementById("main");
  main.replaceChildren();
  if (!(await identify())) return;
  const match = /^\/releases\/([^/]+)\/?$/.exec(location.pathname);
  if (match) await new ReleasePage(main, decodeURIComponent(match[1]), signal).start();
  else await showList(main, signal);
}

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") document.querySelector("#drawer .close")?.click();
});
tokenForm(start);
start();
