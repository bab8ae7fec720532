// Small DOM and formatting helpers shared by the views.

/** An element: h("div", {class: "x", text: "hi", onclick: f, title: "t"}, child, "text", ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** A stable colour for a node id (the same node has the same colour in the chat and the cluster view). */
export function nodeColor(id) {
  let hash = 0;
  for (const ch of String(id)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${(hash * 137) % 360} 60% 44%)`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmtSeconds(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** A layer bar: one segment per [node, start, end), drawn to scale over `total` layers. */
export function layerBar(segments, total, { labels = true } = {}) {
  const bar = h("div", { class: "layerbar", role: "img" });
  bar.setAttribute("aria-label", segments.map((s) => `${s.node}: layers ${s.start}-${s.end - 1}`).join(", "));
  for (const s of segments) {
    const seg = h("span", { class: "seg", title: `${s.node}: layers [${s.start}, ${s.end})`, dataset: { node: s.node } },
      labels ? `${s.node} ${s.start}–${s.end - 1}` : "");
    seg.style.left = `${(100 * s.start) / total}%`;
    seg.style.width = `${(100 * (s.end - s.start)) / total}%`;
    seg.style.background = nodeColor(s.node);
    bar.append(seg);
  }
  return bar;
}
