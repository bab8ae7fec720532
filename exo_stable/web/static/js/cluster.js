// The cluster view: every node (address, health, memory, layers), the layers drawn along the model, the plan
// (epoch, leader), and this node's links (RTT, retransmits). Live: polled every 2 s while shown, backing
// off (doubling up to 30 s) while the node does not answer.

import { AuthError, getJSON } from "./api.js";
import { fmtBytes, h, layerBar, nodeColor } from "./util.js";

const POLL_MS = 2000;
const MAX_BACKOFF_MS = 30000;

export class ClusterView {
  constructor(root, { askKey }) {
    this.root = root;
    this.askKey = askKey;
    this.timer = 0;
    this.delay = POLL_MS;
    this.active = false;
    this.updated = null;
    document.addEventListener("visibilitychange", () => { if (this.active && !document.hidden) this.poll(); });
  }

  show() {
    this.active = true;
    this.poll();
  }

  hide() {
    this.active = false;
    clearTimeout(this.timer);
  }

  async poll() {
    clearTimeout(this.timer);
    if (!this.active || document.hidden) return;
    try {
      const health = await getJSON("/health", { also: [503] });
      let cluster = null;
      try {
        cluster = await getJSON("/v1/cluster");
      } catch (err) {
        if (err instanceof AuthError) throw err;
        if (err.status !== 404) throw err;  // 404: a node without a cluster (the single-device server)
      }
      this.delay = POLL_MS;
      this.updated = new Date();
      this.draw(health, cluster, null);
    } catch (err) {
      if (err instanceof AuthError) this.askKey();
      this.delay = Math.min(this.delay * 2, MAX_BACKOFF_MS);
      this.draw(this.lastHealth, this.lastCluster, `${err.message}; trying again in ${Math.round(this.delay / 1000)} s`);
    }
    if (this.active) this.timer = setTimeout(() => this.poll(), this.delay);
  }

  draw(health, cluster, problem) {
    this.lastHealth = health;
    this.lastCluster = cluster;
    const parts = [];
    const status = problem
      ? h("p", { class: "status offline", text: `Not answering: ${problem}` })
      : h("p", { class: "status live", text: `Live · updated ${this.updated ? this.updated.toLocaleTimeString() : "–"}` });
    parts.push(status);
    if (health && health.status === "unavailable") {
      parts.push(h("p", { class: "status offline", text: `This node cannot serve requests now: ${health.reason}` }));
    }
    if (health) parts.push(...(cluster ? this.clusterParts(health, cluster) : this.singleParts(health)));
    this.root.replaceChildren(...parts.filter(Boolean));
  }

  singleParts(health) {
    return [h("section", { class: "card" }, h("h2", { text: "Single device" }),
      h("p", { text: `${health.model} (${health.dtype}) runs whole on this node: ${health.active_requests} active requests, ${health.generated_tokens} tokens generated.` }))];
  }

  clusterParts(health, cluster) {
    const plan = cluster.plan;
    const stages = plan ? plan.stages : [];
    const total = stages.length ? Math.max(...stages.map((s) => s.end)) : 0;
    const peers = health.peers || {};
    const summary = h("section", { class: "card plan" },
      h("h2", { text: "Plan" }),
      h("dl", { class: "facts-grid" },
        h("dt", { text: "epoch" }), h("dd", { class: "plan-epoch", text: plan ? String(plan.epoch) : "none yet" }),
        h("dt", { text: "leader" }), h("dd", { class: "plan-leader", text: plan ? plan.leader : "–" }),
        h("dt", { text: "model" }), h("dd", { text: `${health.model} (${health.dtype}), ${total} layers` }),
        h("dt", { text: "this page from" }), h("dd", { text: cluster.node_id || health.node_id || "–" })),
      total ? layerBar(stages.map((s) => ({ node: s.node_id, start: s.start, end: s.end })), total) : null,
      total ? h("div", { class: "axis" }, h("span", { text: "layer 0" }), h("span", { text: `layer ${total - 1}` })) : null);
    const nodes = cluster.nodes.map((n) => {
      const card = h("article", { class: `card node health-${n.health}`, dataset: { node: n.id } },
        h("h3", {}, h("i", { class: "dot" }), n.id,
          n.id === (plan && plan.leader) ? h("span", { class: "badge", text: "leader" }) : null,
          n.id === cluster.node_id ? h("span", { class: "badge", text: "this node" }) : null),
        h("dl", { class: "facts-grid" },
          h("dt", { text: "address" }), h("dd", { text: n.address || "–" }),
          h("dt", { text: "health" }), h("dd", { class: `health ${n.health}`, text: n.health }),
          h("dt", { text: "memory" }), h("dd", { text: fmtBytes(n.memory_bytes) }),
          h("dt", { text: "layers" }), h("dd", { class: "layers", text: n.layers ? `${n.layers[0]}–${n.layers[1] - 1} (${n.layers[1] - n.layers[0]})` : "none" }),
          n.id === cluster.node_id ? null : linkRows(peers[n.id])),
        n.layers && total ? layerBar([{ node: n.id, start: n.layers[0], end: n.layers[1] }], total, { labels: false }) : null);
      card.querySelector(".dot").style.background = nodeColor(n.id);
      return card;
    });
    const refused = Object.entries(cluster.refused || {});
    const refusedCard = refused.length
      ? h("section", { class: "card refused" }, h("h2", { text: "Refused peers" }),
        h("dl", { class: "facts-grid" }, refused.flatMap(([who, why]) => [h("dt", { text: who }), h("dd", { text: why })])))
      : null;
    return [summary, h("div", { class: "nodes" }, nodes), refusedCard,
      h("p", { class: "muted", text: `Links as ${cluster.node_id || "this node"} sees them: "out" it dialled, "in" the peer dialled.` })];
  }
}

/** This node's two links to a peer (out: dialled by this node, in: dialled by the peer), as dt/dd rows. */
function linkRows(peer) {
  const links = peer && peer.links ? peer.links : {};
  const both = (f) => ["out", "in"].map((dir) => (links[dir] ? `${f(links[dir])} ${dir}` : null)).filter(Boolean).join(" · ");
  const rtt = both((l) => (l.rtt_ms === null || l.rtt_ms === undefined ? "–" : `${l.rtt_ms.toFixed(1)} ms`));
  if (!rtt) return [h("dt", { text: "link" }), h("dd", { class: "link", text: "not connected" })];
  const rows = [
    h("dt", { text: "RTT" }), h("dd", { class: "link rtt", text: rtt }),
    h("dt", { text: "retransmits" }), h("dd", { class: "link", text: both((l) => String(l.retransmissions)) }),
  ];
  const corrupt = ["out", "in"].reduce((n, dir) => n + ((links[dir] && links[dir].corrupt_frames) || 0), 0);
  if (corrupt) rows.push(h("dt", { text: "corrupt frames" }), h("dd", { class: "link caught", text: String(corrupt) }));
  return rows;
}
