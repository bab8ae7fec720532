// The chat: a conversation list (kept in localStorage), the open conversation's messages rendered as
// markdown, the composer with Send and Stop, edit and regenerate, per-conversation settings, and under each
// answer its figures (time to first token, tokens/s, tokens, finish reason) and its trace (tracePanel).

import { AuthError, apiKey, getJSON, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { DEFAULT_SETTINGS, Store } from "./store.js";
import { tracePanel } from "./traceview.js";
import { fmtSeconds, h } from "./util.js";

const TRACE_POLL_MS = 1000;
const NUMBER_FIELDS = { temperature: parseFloat, top_p: parseFloat, max_tokens: (v) => parseInt(v, 10), seed: (v) => parseInt(v, 10) };

export class Chat {
  constructor({ askKey, model }) {
    this.askKey = askKey;  // async () => resolves once the user gave a key
    this.model = model;  // () => the served model's name
    this.store = new Store();
    this.running = null;  // {controller, conversation, message}
    this.$ = (id) => document.getElementById(id);
    this.$("new-chat").addEventListener("click", () => { if (!this.running) { this.store.create(); this.render(); } });
    this.$("composer").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    this.$("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.send(); }
    });
    this.$("stop").addEventListener("click", () => this.stop());
    this.$("settings-form").addEventListener("input", () => this.readSettings());
    this.render();
  }

  get conversation() {
    return this.store.active();
  }

  // -- rendering --------------------------------------------------------------------------------------

  render() {
    this.renderList();
    this.renderSettings();
    const box = this.$("messages");
    box.replaceChildren();
    const c = this.conversation;
    if (!c.messages.length) {
      box.append(h("div", { class: "empty" }, h("p", { text: `Chat with ${this.model() || "the model"}.` }),
        h("p", { class: "muted", text: "Under each answer: which node computed which tokens, any recovery, and the validation level." })));
    }
    c.messages.forEach((m, i) => box.append(this.messageEl(c, m, i)));
    this.syncComposer();
    box.scrollTop = box.scrollHeight;
  }

  renderList() {
    const list = this.$("conversations");
    const active = this.conversation.id;
    list.replaceChildren(...this.store.conversations.map((c) => {
      const title = h("button", { class: "title", type: "button", text: c.title, title: c.title,
        onclick: () => { if (!this.running) { this.store.activeId = c.id; this.render(); document.body.classList.remove("drawer"); } } });
      const rename = h("button", { class: "icon", type: "button", title: "Rename", "aria-label": "Rename", text: "✎",
        onclick: () => this.startRename(item, c) });
      const del = h("button", { class: "icon", type: "button", title: "Delete", "aria-label": "Delete", text: "×",
        onclick: () => {
          if (this.running && this.running.conversation === c) return;
          if (confirm(`Delete “${c.title}”?`)) { this.store.remove(c.id); this.render(); }
        } });
      const item = h("li", { class: c.id === active ? "active" : "", dataset: { id: c.id } }, title, rename, del);
      return item;
    }));
  }

  startRename(item, c) {
    const input = h("input", { class: "rename", value: c.title, "aria-label": "New title" });
    const done = (keep) => { if (keep) this.store.rename(c.id, input.value); this.renderList(); };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") done(true);
      else if (e.key === "Escape") done(false);
    });
    input.addEventListener("blur", () => done(true));
    item.replaceChildren(input);
    input.focus();
    input.select();
  }

  renderSettings() {
    const form = this.$("settings-form");
    const settings = { ...DEFAULT_SETTINGS, ...this.conversation.settings };
    for (const [name, value] of Object.entries(settings)) if (form.elements[name]) form.elements[name].value = value;
  }

  readSettings() {
    const form = this.$("settings-form");
    const c = this.conversation;
    for (const name of Object.keys(DEFAULT_SETTINGS)) c.settings[name] = form.elements[name].value;
    this.store.save();
  }

  messageEl(c, m, i) {
    const el = h("article", { class: `msg ${m.role}`, dataset: { index: i } });
    this.fillMessage(el, c, m, i);
    return el;
  }

  fillMessage(el, c, m, i) {
    const body = h("div", { class: "body" });
    const raw = h("pre", { class: "raw", hidden: true, text: m.content });
    if (m.role === "user") body.textContent = m.content;
    else renderMarkdown(body, m.content);
    const busy = this.running && this.running.message === m;
    if (busy) body.classList.add("streaming");
    const actions = h("div", { class: "actions" });
    if (!this.running) {
      if (m.role === "user") actions.append(h("button", { type: "button", class: "link edit", text: "Edit", onclick: () => this.edit(el, c, i) }));
      if (m.role === "assistant" && i === c.messages.length - 1) {
        actions.append(h("button", { type: "button", class: "link regenerate", text: "Regenerate", onclick: () => this.regenerate() }));
      }
    }
    if (m.role === "assistant") {
      actions.append(h("button", { type: "button", class: "link", text: "Markdown source",
        onclick: () => { raw.hidden = !raw.hidden; body.hidden = !raw.hidden; } }));
    }
    el.replaceChildren(body, raw);
    if (m.role === "assistant") el.append(this.metaEl(m, busy));
    el.append(actions);
  }

  metaEl(m, busy) {
    const meta = m.meta || {};
    const facts = [];
    if (meta.model) facts.push(h("span", { class: "fact model-name", text: meta.model }));
    if (meta.ttft_ms !== undefined) facts.push(h("span", { class: "fact ttft", text: `TTFT ${fmtSeconds(meta.ttft_ms)}` }));
    if (meta.tokens_per_s) facts.push(h("span", { class: "fact tps", text: `${meta.tokens_per_s.toFixed(1)} tok/s` }));
    if (meta.tokens !== undefined) facts.push(h("span", { class: "fact tokens", text: `${meta.tokens} tokens` }));
    if (meta.finish) facts.push(h("span", { class: `fact finish finish-${meta.finish}`, text: `finish: ${meta.finish}` }));
    if (meta.stopped) {
      const server = meta.trace && meta.trace.finish_reason ? `; server: ${meta.trace.finish_reason}` : "";
      facts.push(h("span", { class: "fact stopped", text: `stopped${server}` }));
    }
    if (busy) facts.push(h("span", { class: "fact busy", text: "generating…" }));
    const box = h("div", { class: "meta" }, h("div", { class: "facts" }, facts));
    if (meta.error) box.append(h("div", { class: "error", text: meta.error }));
    if (meta.trace && meta.request_id) box.append(tracePanel(meta.trace, meta.request_id));
    return box;
  }

  updateMessage(m) {
    const c = this.conversation;
    const i = c.messages.indexOf(m);
    const el = this.$("messages").querySelector(`article[data-index="${i}"]`);
    if (!el) return;
    const box = this.$("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    this.fillMessage(el, c, m, i);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  syncComposer() {
    this.$("send").hidden = Boolean(this.running);
    this.$("stop").hidden = !this.running;
    this.$("new-chat").disabled = Boolean(this.running);
  }

  // -- actions ----------------------------------------------------------------------------------------

  send() {
    if (this.running) return;
    const input = this.$("prompt");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const c = this.conversation;
    c.messages.push({ role: "user", content: text });
    this.generate(c);
  }

  stop() {
    if (this.running) this.running.controller.abort();
  }

  regenerate() {
    const c = this.conversation;
    if (this.running || !c.messages.length || c.messages[c.messages.length - 1].role !== "assistant") return;
    c.messages.pop();
    this.generate(c);
  }

  edit(el, c, i) {
    const area = h("textarea", { class: "edit-box", rows: 3 });
    area.value = c.messages[i].content;
    const save = h("button", { type: "button", class: "primary save", text: "Save and send", onclick: () => {
      if (!area.value.trim()) return;
      c.messages.splice(i);  // the edited message and everything after it are replaced
      c.messages.push({ role: "user", content: area.value.trim() });
      this.generate(c);
    } });
    const cancel = h("button", { type: "button", text: "Cancel", onclick: () => this.render() });
    el.replaceChildren(area, h("div", { class: "actions" }, save, cancel));
    area.focus();
  }

  requestBody(c) {
    const s = c.settings || {};
    const messages = [];
    if (s.system && s.system.trim()) messages.push({ role: "system", content: s.system });
    for (const m of c.messages) if (m.role !== "assistant" || m.content) messages.push({ role: m.role, content: m.content });
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (this.model()) body.model = this.model();
    for (const [name, parse] of Object.entries(NUMBER_FIELDS)) {
      const value = parse(s[name]);
      if (s[name] !== "" && s[name] !== undefined && Number.isFinite(value)) body[name] = value;
    }
    if (s.exo_validation) body.exo_validation = s.exo_validation;
    if (s.exo_replay) body.exo_replay = s.exo_replay;
    return body;
  }

  async generate(c) {
    const body = this.requestBody(c);
    const m = { role: "assistant", content: "", meta: { model: this.model() } };
    c.messages.push(m);
    this.store.touch(c);
    const controller = new AbortController();
    this.running = { controller, conversation: c, message: m };
    this.render();
    const started = performance.now();
    let first = null;
    let last = null;
    let chunks = 0;
    let poller = null;
    let frame = 0;
    const redraw = () => { if (!frame) frame = requestAnimationFrame(() => { frame = 0; this.updateMessage(m); }); };
    const figures = () => {
      if (first !== null) m.meta.ttft_ms = first - started;
      const tokens = m.meta.tokens ?? (m.meta.trace ? m.meta.trace.completion_tokens : chunks);
      if (first !== null && last > first && tokens > 1) m.meta.tokens_per_s = (tokens - 1) / ((last - first) / 1000);
    };
    try {
      for await (const event of streamChat(body, controller.signal)) {
        if (event.error) { m.meta.error = event.error.message; continue; }
        if (!m.meta.request_id && event.id) {
          m.meta.request_id = event.id;
          poller = this.pollTrace(m, () => { figures(); redraw(); this.store.save(); });  // a reload keeps the text so far
        }
        if (event.model) m.meta.model = event.model;
        if (event.usage) m.meta.tokens = event.usage.completion_tokens;
        for (const choice of event.choices || []) {
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (first === null) first = performance.now();
            chunks += 1;
            m.content += text;
          }
          if (choice.finish_reason) m.meta.finish = choice.finish_reason;
        }
        last = performance.now();
        figures();
        redraw();
      }
    } catch (err) {
      if (err.name === "AbortError") m.meta.stopped = true;
      else if (err instanceof AuthError) { m.meta.error = `${err.message}: enter the key and regenerate`; this.askKey(); }
      else m.meta.error = err.message;
    } finally {
      if (poller) poller.stop();
      this.running = null;
      figures();
      this.store.touch(c);
      this.render();
      if (m.meta.request_id) this.finalTrace(m, () => { figures(); this.store.save(); this.updateMessage(m); });
    }
  }

  /** Poll the request's trace while it runs: spans and recoveries appear during the answer. */
  pollTrace(m, changed) {
    let timer = 0;
    let stopped = false;
    const tick = async () => {
      try {
        const trace = await getJSON(`/v1/traces/${encodeURIComponent(m.meta.request_id)}/live`);
        if (stopped) return;  // answered after the answer ended: the final fetch's trace is newer
        m.meta.trace = trace;
        changed();
      } catch { /* the next poll, or the final fetch, tries again */ }
      if (!stopped) timer = setTimeout(tick, TRACE_POLL_MS);
    };
    timer = setTimeout(tick, TRACE_POLL_MS);
    return { stop: () => { stopped = true; clearTimeout(timer); } };
  }

  /** The trace once the request has ended on the server (a stopped one ends when the server sees the client go). */
  async finalTrace(m, changed, delay = 100) {
    try {
      m.meta.trace = await getJSON(`/v1/traces/${encodeURIComponent(m.meta.request_id)}/live`);
      changed();
    } catch { /* the trace left the ring: the figures above stay */ }
    if ((!m.meta.trace || !m.meta.trace.finish_reason) && delay < 5000) {
      setTimeout(() => this.finalTrace(m, changed, delay * 2), delay);
    }
  }
}

/** Open a trace (which needs the key when the node has one) as pretty JSON in a new tab. */
export async function openTrace(href) {
  if (!apiKey()) { window.open(href, "_blank", "noopener"); return; }
  const trace = await getJSON(href);
  const url = URL.createObjectURL(new Blob([JSON.stringify(trace, null, 2)], { type: "application/json" }));
  window.open(url, "_blank", "noopener");
}
