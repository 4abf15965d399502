// The built-in chat page: sign in or register, pick a model, chat with streamed answers, and
// reopen past conversations. Plain DOM code: every piece of user or model text goes through
// textContent (the page's CSP forbids HTML string sinks altogether).
"use strict";

// The tokens live in sessionStorage: they survive a reload but leave with the tab.
const SESSION_KEY = "edgechat.session";
const MODEL_KEY = "edgechat.model";
// Sent with the first turn of a new conversation (and kept with it as context): small local
// models answer far better with a plain system line than with their template's default one.
const SYSTEM = "You are a helpful assistant.";

const $ = (id) => document.getElementById(id);

const state = {
  session: loadSession(),
  conversationId: null,
  cursor: null,
  busy: false,
};

/** An error whose message is meant for the person using the page. */
class ShownError extends Error {}

function loadSession() {
  try {
    return JSON.parse(sessionStorage.getItem(SESSION_KEY));
  } catch {
    return null;
  }
}

function saveSession(session) {
  state.session = session;
  if (session) sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  else sessionStorage.removeItem(SESSION_KEY);
}

// ---- talking to the API ------------------------------------------------------------------

/** What went wrong, from either face's error shape: {"detail"} or {"error": {"message"}}. */
async function errorText(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON: fall through to the status line.
  }
  let text = "";
  const detail = body && body.detail;
  if (typeof detail === "string") text = detail;
  else if (Array.isArray(detail)) {
    text = detail
      .map((e) => {
        const field = Array.isArray(e.loc) ? e.loc.filter((p) => p !== "body").join(".") : "";
        return field ? `${field}: ${e.msg}` : e.msg;
      })
      .join("; ");
  } else if (body && body.error && body.error.message) text = body.error.message;
  if (!text) text = `The server answered ${response.status} ${response.statusText}.`.trim();
  const retry = response.headers.get("retry-after");
  if (response.status === 429 && retry) text += ` Try again in ${retry} s.`;
  return text;
}

/** Sends a JSON request; failures become `ShownError`s with a readable message. */
async function request(path, { method = "GET", body, auth = true } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (auth && state.session) headers.authorization = `Bearer ${state.session.access_token}`;
  try {
    return await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ShownError("Cannot reach the server. Check the connection and try again.");
  }
}

let refreshing = null;

/** Trades the refresh token for a new pair, once for all callers that need it at the same
 *  time: a rotated refresh token used twice revokes the whole session. */
function refreshSession() {
  if (!refreshing) {
    refreshing = (async () => {
      const token = state.session && state.session.refresh_token;
      if (!token) return false;
      try {
        const r = await request("/auth/refresh", {
          method: "POST",
          body: { refresh_token: token },
          auth: false,
        });
        if (!r.ok) return false;
        const t = await r.json();
        saveSession({ ...state.session, access_token: t.access_token, refresh_token: t.refresh_token });
        return true;
      } catch {
        return false;
      }
    })().finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

/** An authenticated call: refreshes an expired access token once, and signs out when the
 *  session is over. Returns the response when it is 2xx. */
async function api(path, options = {}) {
  const sent = state.session && state.session.access_token;
  let r = await request(path, options);
  if (r.status === 401 && state.session) {
    // Another call may have renewed the token while this one was under way.
    const renewed = state.session.access_token !== sent || (await refreshSession());
    if (renewed) r = await request(path, options);
  }
  if (r.status === 401) {
    const text = "Your session has ended. Please sign in again.";
    endSession(text);
    throw new ShownError(text);
  }
  if (!r.ok) throw new ShownError(await errorText(r));
  return r;
}

/** Reads a `text/event-stream` body, calling `onEvent` with each JSON `data:` payload until
 *  `[DONE]`. */
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- small DOM helpers -------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

/** Runs `work` with `button` disabled; a `ShownError` (or any failure) lands in `errorNode`. */
async function busyWith(button, errorNode, work) {
  button.disabled = true;
  show(errorNode, "");
  try {
    await work();
  } catch (e) {
    show(errorNode, e instanceof ShownError ? e.message : `Something went wrong: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---- signing in ----------------------------------------------------------------------------

function showAuth(notice) {
  $("chat-view").hidden = true;
  $("jobs-view").hidden = true;
  $("account").hidden = true;
  $("auth-view").hidden = false;
  show($("auth-notice"), notice);
  $("login-username").focus();
}

function endSession(notice) {
  saveSession(null);
  state.conversationId = null;
  $("messages").replaceChildren();
  $("conversations").replaceChildren();
  showAuth(notice);
}

async function signIn(event) {
  event.preventDefault();
  const form = event.currentTarget;
  await busyWith(form.querySelector("button"), $("login-error"), async () => {
    const username = $("login-username").value.trim();
    const r = await request("/auth/login", {
      method: "POST",
      body: { username, password: $("login-password").value },
      auth: false,
    });
    if (!r.ok) throw new ShownError(r.status === 401 ? "Wrong username or password." : await errorText(r));
    const t = await r.json();
    saveSession({ access_token: t.access_token, refresh_token: t.refresh_token, username });
    form.reset();
    await enterChat();
  });
}

async function register(event) {
  event.preventDefault();
  const form = event.currentTarget;
  await busyWith(form.querySelector("button"), $("register-error"), async () => {
    const body = {
      username: $("register-username").value.trim(),
      email: $("register-email").value.trim(),
      password: $("register-password").value,
    };
    const r = await request("/auth/register", { method: "POST", body, auth: false });
    if (!r.ok) throw new ShownError(await errorText(r));
    form.reset();
    show($("auth-notice"), `Account “${body.username}” created. Sign in to start chatting.`);
    $("login-username").value = body.username;
    $("login-password").focus();
  });
}

async function signOut() {
  const token = state.session && state.session.refresh_token;
  endSession("You are signed out.");
  if (token) {
    // Best effort: the tokens are already gone from this tab either way.
    request("/auth/logout", { method: "POST", body: { refresh_token: token }, auth: false }).catch(() => {});
  }
}

async function enterChat() {
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  $("account").hidden = false;
  $("who").textContent = state.session.username || "";
  newChat();
  const results = await Promise.allSettled([loadMe(), loadModels(), loadConversations(false)]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed && state.session) show($("chat-error"), failed.reason.message);
}

async function loadMe() {
  const me = await (await api("/auth/me")).json();
  $("who").textContent = me.username;
  // Admins get the queue's page; /admin/jobs needs the bearer token only this page holds.
  $("jobs-link").hidden = !me.is_admin;
  saveSession({ ...state.session, username: me.username });
}

// ---- models and conversations ---------------------------------------------------------------

async function loadModels() {
  const list = await (await api("/v1/models")).json();
  const select = $("model");
  const chosen = localStorage.getItem(MODEL_KEY) || "";
  const options = [el("option", "", "Server default")];
  options[0].value = "";
  for (const m of list.data || []) {
    const option = el("option", "", `${m.id} (${m.owned_by})`);
    option.value = m.id;
    options.push(option);
  }
  select.replaceChildren(...options);
  select.value = options.some((o) => o.value === chosen) ? chosen : "";
}

async function loadConversations(more) {
  const query = new URLSearchParams({ limit: "20" });
  if (more && state.cursor) query.set("cursor", state.cursor);
  const page = await (await api(`/conversations?${query}`)).json();
  state.cursor = page.next_cursor;
  const list = $("conversations");
  const items = page.items.map((c) => {
    const button = el("button", "conversation");
    button.type = "button";
    button.dataset.id = c.id;
    button.append(el("span", "title", c.title || "Untitled"), el("span", "when", formatTime(c.updated_at)));
    button.title = `${c.title} · ${c.model} · ${c.message_count} messages`;
    button.addEventListener("click", () => openConversation(c.id));
    const li = el("li");
    li.append(button);
    return li;
  });
  if (more) list.append(...items);
  else list.replaceChildren(...items);
  $("conversations-empty").hidden = list.children.length > 0;
  $("more-conversations").hidden = !state.cursor;
  markCurrent();
}

function markCurrent() {
  for (const button of $("conversations").querySelectorAll("button")) {
    if (button.dataset.id === state.conversationId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

function newChat() {
  if (state.busy) return;
  state.conversationId = null;
  $("messages").replaceChildren();
  show($("chat-error"), "");
  markCurrent();
  $("message").focus();
}

async function openConversation(id) {
  if (state.busy) return;
  show($("chat-error"), "");
  try {
    const c = await (await api(`/conversations/${encodeURIComponent(id)}`)).json();
    state.conversationId = c.id;
    const nodes = c.messages
      .filter((m) => m.role !== "system")
      .map((m) => {
        const node = messageNode(m.role, m.content);
        if (m.role === "assistant") {
          const tokens = m.usage && m.usage.completion_tokens;
          describeAnswer(node, { model: m.model, provider: m.provider, tokens });
        }
        return node;
      });
    $("messages").replaceChildren(...nodes);
    const select = $("model");
    if ([...select.options].some((o) => o.value === c.model)) select.value = c.model;
    markCurrent();
    scrollToEnd(true);
    $("message").focus();
  } catch (e) {
    show($("chat-error"), e.message);
  }
}

// ---- the conversation itself -----------------------------------------------------------------

function messageNode(role, text) {
  const li = el("li", `msg ${role}`);
  li.append(el("span", "visually-hidden", role === "user" ? "You said:" : "Answer:"));
  li.append(el("div", "content", text));
  return li;
}

/** The line under an answer: the model and provider, and a visible mark for a fallback. */
function describeAnswer(node, { model, provider, fallback, reason, tokens }) {
  const meta = el("div", "meta");
  if (model) meta.append(el("span", "model", model));
  if (provider) meta.append(el("span", "provider", provider));
  if (tokens) meta.append(el("span", "tokens", `${tokens} tokens`));
  if (fallback) {
    const badge = el("span", "badge fallback", "answered by local fallback");
    if (reason) badge.title = reason;
    meta.append(badge);
    node.dataset.fallback = "true";
  }
  node.append(meta);
}

function scrollToEnd(force) {
  const log = $("messages");
  const nearEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  if (force || nearEnd) log.scrollTop = log.scrollHeight;
}

async function send(event) {
  event.preventDefault();
  const input = $("message");
  const text = input.value.trim();
  if (!text || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  show($("chat-error"), "");

  const log = $("messages");
  log.append(messageNode("user", text));
  const answer = messageNode("assistant", "");
  answer.dataset.state = "streaming";
  answer.setAttribute("aria-busy", "true");
  log.append(answer);
  input.value = "";
  scrollToEnd(true);

  const content = answer.querySelector(".content");
  const body = { message: text, stream: true };
  if ($("model").value) body.model = $("model").value;
  if (state.conversationId) body.conversation_id = state.conversationId;
  else body.system = SYSTEM;
  try {
    const r = await api("/chat", { method: "POST", body });
    const why = [r.headers.get("x-edgechat-fallback"), r.headers.get("x-edgechat-fallback-reason")];
    let final = null;
    await readEvents(r, (data) => {
      if (typeof data.delta === "string") {
        content.textContent += data.delta;
        scrollToEnd(false);
      } else if (data.error) {
        throw new ShownError(data.error.message || "The answer was interrupted.");
      } else if (data.conversation_id !== undefined) {
        final = data;
      }
    });
    if (!final) throw new ShownError("The answer ended early. Please try again.");
    content.textContent = final.response;
    describeAnswer(answer, {
      model: final.model,
      provider: final.provider,
      fallback: final.fallback,
      reason: why.filter(Boolean).join(": "),
      tokens: final.usage && final.usage.completion_tokens,
    });
    answer.dataset.state = "done";
    const isNew = state.conversationId !== final.conversation_id;
    state.conversationId = final.conversation_id;
    await loadConversations(false).catch((e) => show($("chat-error"), e.message));
    if (isNew) markCurrent();
  } catch (e) {
    answer.dataset.state = "failed";
    const message = e instanceof ShownError ? e.message : `Something went wrong: ${e.message}`;
    answer.append(el("div", "meta failure", `Not answered: ${message}`));
    show($("chat-error"), message);
    // Nothing was stored: give the words back so they can be sent again.
    if (!input.value) input.value = text;
  } finally {
    answer.removeAttribute("aria-busy");
    state.busy = false;
    $("send").disabled = false;
    scrollToEnd(false);
    if (state.session) input.focus();
  }
}

// ---- the job queue (admins) ---------------------------------------------------------------

async function showJobs() {
  $("chat-view").hidden = true;
  $("jobs-view").hidden = false;
  show($("jobs-error"), "");
  try {
    const r = await api("/admin/jobs");
    if (!r.ok) throw new Error(r.status === 404 ? "Only administrators see the job queue." : `HTTP ${r.status}`);
    renderJobs(await r.json());
  } catch (e) {
    show($("jobs-error"), `The job queue could not be loaded: ${e.message}`);
  }
}

function renderJobs(view) {
  const states = Object.entries(view.counts || {});
  const head = el("tr");
  const counts = el("tr");
  for (const [name, n] of states) {
    head.append(el("th", "", name));
    counts.append(el("td", "", String(n)));
  }
  $("jobs-counts").replaceChildren(head, counts);
  const oldest = view.oldest_queued_age_s == null ? "none" : `${view.oldest_queued_age_s.toFixed(1)} s`;
  $("jobs-summary").textContent =
    `Oldest queued: ${oldest} · finished per minute (last hour): ${view.throughput_per_min.toFixed(2)}` +
    ` · failure rate: ${(view.failure_rate * 100).toFixed(1)}%`;
  const rows = (tasks) => {
    const header = el("tr");
    for (const h of ["task", "attempts", "started", "error"]) header.append(el("th", "", h));
    const body = tasks.map((t) => {
      const row = el("tr");
      for (const v of [t.task_id, String(t.attempts), t.started_at ? formatTime(t.started_at) : "", t.error || ""]) {
        row.append(el("td", "", v));
      }
      return row;
    });
    return [header, ...body];
  };
  $("jobs-running").replaceChildren(...rows(view.running || []));
  $("jobs-failures").replaceChildren(...rows(view.recent_failures || []));
}

function hideJobs() {
  $("jobs-view").hidden = true;
  $("chat-view").hidden = false;
}

// ---- wiring --------------------------------------------------------------------------------

function start() {
  $("login-form").addEventListener("submit", signIn);
  $("register-form").addEventListener("submit", register);
  $("sign-out").addEventListener("click", signOut);
  $("jobs-link").addEventListener("click", showJobs);
  $("jobs-refresh").addEventListener("click", showJobs);
  $("jobs-back").addEventListener("click", hideJobs);
  $("new-chat").addEventListener("click", newChat);
  $("more-conversations").addEventListener("click", () =>
    loadConversations(true).catch((e) => show($("chat-error"), e.message)),
  );
  $("model").addEventListener("change", (e) => localStorage.setItem(MODEL_KEY, e.target.value));
  $("chat-form").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  if (state.session && state.session.access_token) enterChat();
  else showAuth("");
}

start();
