// Conversations, kept in this browser's localStorage (one JSON document), and which one is open.

const KEY = "exo-stable.conversations.v1";
const ACTIVE = "exo-stable.active";

export const DEFAULT_SETTINGS = Object.freeze({
  system: "", temperature: "", top_p: "", max_tokens: "", seed: "", exo_validation: "", exo_replay: "",
});

function load() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

export class Store {
  constructor() {
    this.conversations = load();
  }

  save() {
    localStorage.setItem(KEY, JSON.stringify(this.conversations));
  }

  get activeId() {
    return localStorage.getItem(ACTIVE);
  }

  set activeId(id) {
    localStorage.setItem(ACTIVE, id);
  }

  active() {
    return this.get(this.activeId) || this.conversations[0] || this.create();
  }

  get(id) {
    return this.conversations.find((c) => c.id === id) || null;
  }

  create() {
    const conversation = {
      id: crypto.randomUUID(), title: "New chat", titled: false, created: Date.now(), updated: Date.now(),
      settings: { ...DEFAULT_SETTINGS }, messages: [],
    };
    this.conversations.unshift(conversation);
    this.activeId = conversation.id;
    this.save();
    return conversation;
  }

  rename(id, title) {
    const c = this.get(id);
    if (!c || !title.trim()) return;
    c.title = title.trim().slice(0, 120);
    c.titled = true;
    this.save();
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.activeId === id) this.activeId = this.conversations[0] ? this.conversations[0].id : "";
    this.save();
  }

  touch(c) {
    c.updated = Date.now();
    if (!c.titled) {
      const first = c.messages.find((m) => m.role === "user");
      if (first) c.title = first.content.replace(/\s+/g, " ").trim().slice(0, 60) || "New chat";
    }
    this.conversations.sort((a, b) => b.updated - a.updated);
    this.save();
  }
}
