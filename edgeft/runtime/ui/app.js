// edgeft's browser page: chat, classify, rerank and embed against this server's own /v1 routes.
// A reasoning model's thinking (reasoning_content) is shown apart from its answer, collapsed.
// Everything shown that comes from a model or the server is set as text (textContent,
// createElement), never parsed as markup. The API key, when the server wants one, is asked
// once and kept in this tab's sessionStorage. The model list and card say which served models
// share a trunk (split artifacts tuned from one base run its embeddings and lower blocks once).
"use strict";

const KEY_STORE = "edgeft.apiKey";
const VIEWS = { "causal-lm": "chat", classification: "classify", embedding: "embed", embeddings: "embed" };
const $ = (id) => document.getElementById(id);

const state = {
  models: [],
  model: null,            // the model picked for the current view
  view: null,
  history: [],            // chat messages [{role, content}] (system prompt not included)
  controller: null,       // AbortController of the chat request in flight
  keyWaiters: null,       // pending resolvers while the key dialog is open
};

// ------------------------------------------------------------------ DOM helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("aria-") || k === "role") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);  // strings become text nodes
  return node;
}

function notice(message, kind = "info") {
  const n = $("notice");
  n.textContent = message || "";
  n.dataset.kind = kind;
  n.hidden = !message;
}

// ------------------------------------------------------------------ HTTP

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

function askKey(wrong) {
  if (state.keyWaiters) return new Promise((resolve) => state.keyWaiters.push(resolve));
  state.keyWaiters = [];
  return new Promise((resolve) => {
    state.keyWaiters.push(resolve);
    $("key-why").textContent = wrong
      ? "That key was not accepted. Try again."
      : "This server wants an API key. It stays in this browser tab only.";
    $("key-input").value = "";
    $("key-dialog").showModal();
    $("key-input").focus();
  });
}

function keyEntered(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("key-dialog").close();
  const waiters = state.keyWaiters || [];
  state.keyWaiters = null;
  for (const resolve of waiters) resolve();
}

class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") return body.error.message;
  } catch (_) { /* not JSON */ }
  return response.status + " " + response.statusText;
}

// fetch with the bearer key; on 401 ask for the key and try again.
async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = { ...(options.headers || {}), ...authHeaders() };
    if (options.json !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method: options.json !== undefined ? "POST" : "GET",
      headers,
      body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
      signal: options.signal,
    });
    if (response.status === 401 && attempt < 5) {
      const hadKey = Boolean(sessionStorage.getItem(KEY_STORE));
      await askKey(hadKey);
      continue;
    }
    if (!response.ok) throw new ApiFailure(response.status, await errorMessage(response));
    return response;
  }
}

// Server-sent events of a fetch response, one parsed JSON object per `data:` line.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ------------------------------------------------------------------ models

function viewOf(model) { return VIEWS[model.task] || null; }

async function loadModels() {
  for (;;) {
    try {
      const response = await api("/v1/models");
      const body = await response.json();
      state.models = (body.data || []).filter((m) => viewOf(m));
      notice("");
      return;
    } catch (err) {
      if (err instanceof ApiFailure && err.status === 503) {
        notice("The models are still loading…");
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      notice("Could not list the models: " + err.message, "error");
      return;
    }
  }
}

function fillPicker() {
  const select = $("model");
  select.replaceChildren();
  const groups = { chat: "Chat", classify: "Classify", embed: "Embed" };
  $("tab-rerank").hidden = !state.models.some((m) => viewsOf(m).includes("rerank"));
  for (const [view, label] of Object.entries(groups)) {
    const models = state.models.filter((m) => viewOf(m) === view);
    $("tab-" + view).hidden = models.length === 0;
    if (!models.length) continue;
    const group = el("optgroup", { label });
    for (const m of models) {
      const shared = trunkShared(m, 3);
      group.append(el("option", { value: m.id, text: shared ? m.id + " · " + shared : m.id, title: trunkFact(m) || "" }));
    }
    select.append(group);
  }
}

// A split model's trunk (its base's embeddings and frozen blocks, one session for every served model that
// carries the same bytes), as /v1/models describes it: "shares trunk 1a2b3c4d with x, y", naming at most
// `most` others (the rest counted), or null where the model has no trunk or shares it with none.
function trunkShared(model, most = Infinity) {
  const t = model.trunk;
  const others = t && Array.isArray(t.shared_with) ? t.shared_with : [];
  if (!others.length || typeof t.sha256 !== "string") return null;
  const named = others.length <= most ? others.join(", ")
    : others.slice(0, most - 1).join(", ") + " and " + (others.length - most + 1) + " more";
  return "shares trunk " + t.sha256.slice(0, 8) + " with " + named;
}

// The model card's line on the trunk: its digest, its boundary and every model it is shared with.
function trunkFact(model) {
  const t = model.trunk;
  if (!t || typeof t.sha256 !== "string") return null;
  const others = Array.isArray(t.shared_with) ? t.shared_with : [];
  const what = t.sha256.slice(0, 16) + (typeof t.blocks === "number" ? " (embeddings and " + t.blocks + " blocks)" : "");
  return what + (others.length ? ", shared with " + others.join(", ") : ", not shared with another model served here");
}

// The views a model serves: a classifier also ranks documents (/v1/rerank) where it reads pairs;
// a server that does not say (no "pairs" in /v1/models) lets the rerank view try every classifier.
function viewsOf(model) {
  const view = viewOf(model);
  return view === "classify" && model.pairs !== false ? [view, "rerank"] : [view];
}

function pick(id, wanted) {
  const model = state.models.find((m) => m.id === id);
  if (!model) return;
  const views = viewsOf(model);
  const view = views.includes(wanted) ? wanted : views.includes(state.view) ? state.view : views[0];
  if (state.model && state.model.id !== model.id && view === "chat") resetChat();
  state.model = model;
  $("model").value = model.id;
  showView(view);
  showCard(model);
}

function showView(view) {
  state.view = view;
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const on = tab.dataset.view === view;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $("view-" + tab.dataset.view).hidden = !on;
  }
}

function chooseTab(view) {
  if (state.model && viewsOf(state.model).includes(view)) { showView(view); return; }
  const fits = state.models.filter((m) => viewsOf(m).includes(view));
  const first = fits.find((m) => m.pairs === true) || fits[0];
  if (first) pick(first.id, view);
}

function tabKeys(event) {
  const tabs = [...document.querySelectorAll('[role="tab"]')].filter((t) => !t.hidden);
  const i = tabs.indexOf(event.target);
  let next = null;
  if (event.key === "ArrowRight") next = tabs[(i + 1) % tabs.length];
  else if (event.key === "ArrowLeft") next = tabs[(i - 1 + tabs.length) % tabs.length];
  else if (event.key === "Home") next = tabs[0];
  else if (event.key === "End") next = tabs[tabs.length - 1];
  if (!next) return;
  event.preventDefault();
  chooseTab(next.dataset.view);
  next.focus();
}

// ------------------------------------------------------------------ the model card

function formatBytes(n) {
  if (typeof n !== "number") return null;
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function signed(x, digits) {
  return (x > 0 ? "+" : "") + x.toFixed(digits);
}

function gateSummary(gate, task) {
  if (!gate || typeof gate !== "object" || gate.passed === undefined) return "not gated";
  const m = gate.metrics || {};
  const parts = [];
  if (typeof m.perplexity_increase_pct === "number") parts.push("perplexity " + signed(m.perplexity_increase_pct, 2) + "% vs PyTorch");
  if (typeof m.token_agreement === "number") parts.push("greedy-token agreement " + (100 * m.token_agreement).toFixed(1) + "%");
  if (typeof m.accuracy === "number") {
    const drop = typeof m.accuracy_drop_points === "number" ? m.accuracy_drop_points : null;
    const vs = drop === null ? "" : Math.abs(drop) < 0.005 ? " (same as PyTorch)"
      : " (" + Math.abs(drop).toFixed(2) + " points " + (drop > 0 ? "below" : "above") + " PyTorch)";
    parts.push("accuracy " + (100 * m.accuracy).toFixed(1) + "%" + vs);
  }
  if (typeof m.mean_cosine === "number") parts.push("mean cosine to PyTorch's vectors " + m.mean_cosine.toFixed(4));
  if (typeof m.label_agreement === "number") parts.push("label agreement " + (100 * m.label_agreement).toFixed(1) + "%");
  const verdict = gate.passed ? "passed" : gate.degraded ? "FAILED (served anyway: --allow-degraded)" : "failed";
  return (parts.length ? parts.join(", ") + ": " : "") + verdict;
}

function showCard(model) {
  const card = model.manifest || {};
  const facts = [
    ["Task", model.task],
    ["Base model", card.base_model],
    ["Architecture", card.architecture],
    ["Quantization", card.quantization],
    ["Size", formatBytes(card.size_bytes)],
    ["Context", model.context_length ? model.context_length + " tokens" : null],
    ["Labels", Array.isArray(model.labels) ? model.labels.join(", ") : null],
    ["Dimensions", model.dimensions || null],
    ["Gate", gateSummary(card.gate, model.task)],
    ["Signed by", !card.signed_by ? "not signed" : "key " + card.signed_by +
      (card.signature_checked ? " (verified by this server)" : " (not checked: serve has no --trusted-key)")],
    ["Trunk", trunkFact(model)],
    ["Digest", card.digest ? card.digest.slice(0, 23) + "…" : null],
  ];
  const dl = $("model-facts");
  dl.replaceChildren();
  for (const [name, value] of facts) {
    if (value === null || value === undefined || value === "") continue;
    const row = el("div", { class: "fact" }, el("dt", { text: name }), el("dd", { text: String(value) }));
    if (name === "Gate") row.dataset.verdict = card.gate && card.gate.passed ? "passed" : "failed";
    if (["Gate", "Base model", "Signed by", "Trunk", "Digest"].includes(name)) row.classList.add("wide");
    dl.append(row);
  }
  const verdict = card.gate && card.gate.passed !== undefined ? (card.gate.passed ? "gate passed" : "gate failed") : null;
  const brief = [card.quantization, formatBytes(card.size_bytes), verdict,
    card.signed_by ? (card.signature_checked ? "signature verified" : "signed") : null,
    model.trunk && model.trunk.shared_with && model.trunk.shared_with.length
      ? "trunk shared with " + model.trunk.shared_with.length + " other" + (model.trunk.shared_with.length > 1 ? "s" : "")
      : null];
  $("model-summary").textContent = brief.filter(Boolean).join(" · ");
  const box = $("model-card");
  if (box.hidden) {  // open where there is room for it; a phone shows the one-line summary
    const wide = window.matchMedia("(min-width: 48rem)");
    box.open = wide.matches;
    wide.addEventListener("change", (e) => { box.open = e.matches; });
  }
  box.hidden = false;
}

// ------------------------------------------------------------------ chat

function resetChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("transcript").replaceChildren();
  $("chat-stats").textContent = "";
}

function bubble(role, text) {
  const body = el("div", { class: "content", text });
  const item = el("li", { class: "msg " + role }, el("div", { class: "who", text: role === "user" ? "You" : role }), body);
  $("transcript").append(item);
  followBottom(true);
  return { item, body };
}

function numberField(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const v = Number(raw);
  return Number.isFinite(v) ? v : undefined;
}

function chatRequest() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { model: state.model.id, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = numberField("temperature");
  const topP = numberField("top-p");
  const maxTokens = numberField("max-tokens");
  if (temperature !== undefined) body.temperature = temperature;
  if (topP !== undefined) body.top_p = topP;
  if (maxTokens !== undefined) body.max_tokens = Math.round(maxTokens);
  const stop = $("stop-strings").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) body.stop = stop;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

// tokens/s over the decode (first to last token); when the whole answer came in one read,
// over the whole request instead.
function stats(tokens, t0, tFirst, tLast, ending) {
  const parts = [tokens + (tokens === 1 ? " token" : " tokens")];
  if (tFirst !== null) {
    parts.push("first token after " + Math.round(tFirst - t0) + " ms");
    const decode = tLast - tFirst >= 1 && tokens > 1;
    const rate = decode ? (tokens - 1) / ((tLast - tFirst) / 1000) : tokens / (Math.max(1, tLast - t0) / 1000);
    parts.push(rate.toFixed(1) + " tokens/s");
  }
  if (ending) parts.push(ending);
  return parts.join(" · ");
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 120;
}

function followBottom(wasNear) {
  if (wasNear) window.scrollTo(0, document.documentElement.scrollHeight);
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.controller || !state.model) return;
  $("prompt").value = "";
  state.history.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  answer.item.classList.add("streaming");
  // Text goes into one text node, at most once per frame: a fast model must not freeze the page.
  const textNode = document.createTextNode("");
  answer.body.append(textNode);
  // A reasoning model's thinking goes into its own collapsed block above the answer.
  let thinking = null, thoughtNode = null, thought = "", pendingThought = "";
  const thinkingBlock = () => {
    if (thinking) return;
    thoughtNode = document.createTextNode("");
    thinking = el("details", { class: "thinking" }, el("summary", { text: "Thinking…" }),
      el("div", { class: "thought" }, thoughtNode));
    answer.item.insertBefore(thinking, answer.body);
  };
  let pending = "", scheduled = false;
  const flush = () => {
    scheduled = false;
    if (!pending && !pendingThought) return;
    const follow = nearBottom();
    if (pendingThought) { thinkingBlock(); thoughtNode.appendData(pendingThought); pendingThought = ""; }
    textNode.appendData(pending);
    pending = "";
    followBottom(follow);
  };
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  $("chat-stats").textContent = "";
  let content = "", chunks = 0, usage = null, finish = null, ending = null;
  const t0 = performance.now();
  let tFirst = null, tLast = null;
  try {
    const response = await api("/v1/chat/completions", { json: chatRequest(), signal: controller.signal });
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message || "generation failed");
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const reasoning = choice.delta && choice.delta.reasoning_content;
        if (reasoning) {
          tLast = performance.now();
          if (tFirst === null) tFirst = tLast;
          thought += reasoning;
          pendingThought += reasoning;
          if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
        }
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          tLast = performance.now();
          if (tFirst === null) tFirst = tLast;
          chunks++;
          content += piece;
          pending += piece;
          if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    ending = finish === "length" ? "stopped at max tokens" : finish === "stop" ? null : finish;
  } catch (err) {
    if (err.name === "AbortError") ending = "stopped";
    else {
      ending = "error";
      answer.item.append(el("p", { class: "error", text: err.message }));
    }
  } finally {
    flush();
    if (thinking) thinking.firstChild.textContent = "Thought (" + thought.length + " characters)";
    answer.item.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    if (content) state.history.push({ role: "assistant", content });
    else if (ending !== "error") answer.body.textContent = thought ? "(no answer after the thinking)" : "(no text)";
    const tokens = usage ? usage.completion_tokens : chunks;
    $("chat-stats").textContent = stats(tokens, t0, tFirst, tLast, ending);
    $("prompt").focus();
    followBottom(true);
  }
}

function stopChat() {
  if (state.controller) state.controller.abort();
}

function promptKeys(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  } else if (event.key === "Escape" && state.controller) {
    stopChat();
  }
}

// ------------------------------------------------------------------ classify

function classifyTexts() {
  const raw = $("classify-input").value;
  if ($("classify-whole").checked) return raw.trim() ? [raw] : [];
  return raw.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
}

function bars(scores, top, labels) {
  const list = el("ul", { class: "bars" });
  const order = Array.isArray(labels) && labels.length ? labels : Object.keys(scores);
  for (const label of order) {
    const p = Number(scores[label] || 0);
    const pct = (100 * p).toFixed(1) + "%";
    const fill = el("span", { class: "fill" });
    fill.style.width = Math.max(0, Math.min(100, 100 * p)) + "%";
    const row = el("li", { class: label === top ? "bar best" : "bar" },
      el("span", { class: "name", text: label }),
      el("span", { class: "track", "aria-hidden": "true" }, fill),
      el("span", { class: "pct", text: pct }));
    list.append(row);
  }
  return list;
}

async function runClassify(event) {
  event.preventDefault();
  const texts = classifyTexts();
  if (!texts.length || !state.model) return;
  const results = $("classify-results");
  $("classify-run").disabled = true;
  try {
    const response = await api("/v1/classify", { json: { model: state.model.id, input: texts } });
    const body = await response.json();
    results.replaceChildren();
    for (const item of body.data || []) {
      const text = texts[item.index] !== undefined ? texts[item.index] : "";
      results.append(el("li", { class: "card result" },
        el("p", { class: "text", text }),
        el("p", { class: "label" }, el("span", { class: "chip", text: String(item.label) }),
          " " + (100 * Number(item.score)).toFixed(1) + "%"),
        bars(item.scores || {}, item.label, state.model.labels)));
    }
    if (results.firstChild) results.firstChild.scrollIntoView({ block: "nearest" });
  } catch (err) {
    results.replaceChildren(el("li", { class: "card error", text: err.message }));
  } finally {
    $("classify-run").disabled = false;
  }
}

// ------------------------------------------------------------------ rerank

async function runRerank(event) {
  event.preventDefault();
  const query = $("rerank-query").value.trim();
  const documents = $("rerank-docs").value.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
  if (!query || !documents.length || !state.model) return;
  const results = $("rerank-results");
  $("rerank-run").disabled = true;
  try {
    const response = await api("/v1/rerank", { json: { model: state.model.id, query, documents } });
    const body = await response.json();
    results.replaceChildren();
    for (const item of body.results || []) {
      const p = Number(item.relevance_score);
      const fill = el("span", { class: "fill" });
      fill.style.width = Math.max(0, Math.min(100, 100 * p)) + "%";
      results.append(el("li", { class: "card result ranked" },
        el("p", { class: "text", text: documents[item.index] !== undefined ? documents[item.index] : "" }),
        el("p", { class: "label" }, el("span", { class: "chip", text: "#" + (item.index + 1) }),
          " relevance " + p.toFixed(3)),
        el("span", { class: "track wide", "aria-hidden": "true" }, fill)));
    }
  } catch (err) {
    results.replaceChildren(el("li", { class: "card error", text: err.message }));
  } finally {
    $("rerank-run").disabled = false;
  }
}

// ------------------------------------------------------------------ embed

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

async function runEmbed(event) {
  event.preventDefault();
  const a = $("embed-a").value, b = $("embed-b").value;
  if (!a.trim() || !b.trim() || !state.model) return;
  const out = $("embed-result");
  out.hidden = false;
  $("embed-run").disabled = true;
  try {
    const response = await api("/v1/embeddings", { json: { model: state.model.id, input: [a, b] } });
    const body = await response.json();
    const vectors = (body.data || []).slice().sort((x, y) => x.index - y.index).map((d) => d.embedding);
    if (vectors.length !== 2) throw new Error("expected two embeddings, got " + vectors.length);
    const sim = cosine(vectors[0], vectors[1]);
    const fill = el("span", { class: "fill" });
    fill.style.width = (50 * (sim + 1)) + "%";
    out.replaceChildren(
      el("p", { class: "similarity" }, "Cosine similarity ", el("strong", { id: "similarity", text: sim.toFixed(3) })),
      el("span", { class: "track wide", "aria-hidden": "true" }, fill),
      el("p", { class: "hint", text: vectors[0].length + " dimensions; 1 means the same direction, 0 unrelated, −1 opposite." }));
  } catch (err) {
    out.replaceChildren(el("p", { class: "error", text: err.message }));
  } finally {
    $("embed-run").disabled = false;
  }
}

// ------------------------------------------------------------------ start

async function start() {
  $("key-form").addEventListener("submit", keyEntered);
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault());  // the page is useless without it
  $("chat-form").addEventListener("submit", sendChat);
  $("prompt").addEventListener("keydown", promptKeys);
  $("stop").addEventListener("click", stopChat);
  $("new-chat").addEventListener("click", () => { resetChat(); $("prompt").focus(); });
  $("classify-form").addEventListener("submit", runClassify);
  $("classify-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("classify-form").requestSubmit(); }
  });
  $("embed-form").addEventListener("submit", runEmbed);
  $("rerank-form").addEventListener("submit", runRerank);
  $("rerank-docs").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("rerank-form").requestSubmit(); }
  });
  $("model").addEventListener("change", (e) => pick(e.target.value));
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => chooseTab(tab.dataset.view));
    tab.addEventListener("keydown", tabKeys);
  }
  await loadModels();
  fillPicker();
  if (!state.models.length) {
    if ($("notice").hidden) notice("This server serves no model this page can use.", "error");
    return;
  }
  pick(state.models[0].id);
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
