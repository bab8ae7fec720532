// What a request's trace says, in words and pictures: which nodes computed which tokens, each recovery,
// and the validation level with the corruption it caught. Input: GET /v1/traces/{id}/live.

import { h, layerBar, nodeColor, fmtSeconds } from "./util.js";

/** Did the spans hand over without a gap or an overlap, covering tokens 0..completion_tokens-1? */
export function contiguous(trace) {
  let next = 0;
  for (const span of trace.spans || []) {
    if (span.from_token === null) continue;  // an attempt that produced nothing new
    if (span.from_token !== next) return false;
    next = span.to_token + 1;
  }
  return next === trace.completion_tokens;
}

/** "node n1 lost at token 37, resumed on plan 5 after 1.8 s (exact replay of 37 tokens), answer unchanged". */
export function recoverySentence(trace, span) {
  const r = span.recovery;
  const what = {
    node_lost: "lost", step_deadline: "missed its deadline", checksum: "sent a corrupt result",
    barrier_timeout: "did not answer", stage_failure: "failed a step", plan_replaced: "was re-planned away",
    stage_escalated: "crashed repeatedly", spot_check: "failed a spot check", no_plan: "left no plan",
  }[r.failure] || r.failure;
  const who = r.node_id ? `node ${r.node_id}` : "the pipeline";
  let text = `${who} ${what} at token ${r.from_position}`;
  if (span.resumed_after_ms === null || span.resumed_after_ms === undefined) return `${text}; recovering…`;
  text += `, resumed on plan ${span.plan_epoch ?? "?"} after ${fmtSeconds(span.resumed_after_ms)}`;
  text += ` (${trace.replay || "?"} replay of ${span.replayed_tokens} token${span.replayed_tokens === 1 ? "" : "s"})`;
  if (trace.finish_reason && contiguous(trace)) {
    text += trace.replay === "exact"
      ? ", answer unchanged: no token lost or repeated"
      : ", no token lost or repeated (fast replay: what follows may differ from an uninterrupted run)";
  }
  return text;
}

export function corruptionCaught(trace) {
  return (trace.resend_requests || 0) + (trace.link_corrupt_frames || 0);
}

/** The trace panel under an answer. */
export function tracePanel(trace, requestId) {
  const panel = h("div", { class: "trace" });
  const spans = trace.spans || [];
  const total = Math.max(1, ...spans.flatMap((s) => s.stages.map((st) => st.layers[1])));
  for (const span of spans) {
    if (span.recovery) {
      panel.append(h("div", { class: "recovery", role: "note" }, h("strong", { text: "Recovery: " }),
        recoverySentence(trace, span)));
    }
    if (span.from_token === null) continue;
    const tokens = span.from_token === span.to_token ? `token ${span.from_token}` : `tokens ${span.from_token}–${span.to_token}`;
    panel.append(h("div", { class: "span" },
      h("span", { class: "span-tokens", text: tokens }),
      span.plan_epoch !== null && span.plan_epoch !== undefined ? h("span", { class: "muted", text: `plan ${span.plan_epoch}` }) : null,
      h("span", { class: "span-nodes" }, span.stages.map((st) =>
        h("span", { class: "chip", title: `layers [${st.layers[0]}, ${st.layers[1]})` },
          h("i", { class: "dot" }, ""), `${st.node_id} ${st.layers[0]}–${st.layers[1] - 1}`))),
      layerBar(span.stages.map((st) => ({ node: st.node_id, start: st.layers[0], end: st.layers[1] })), total, { labels: false })));
  }
  for (const dot of panel.querySelectorAll(".chip")) {
    dot.querySelector(".dot").style.background = nodeColor(dot.textContent.trim().split(" ")[0]);
  }
  const caught = corruptionCaught(trace);
  const level = trace.validation
    ? `validation ${trace.validation}: ${caught ? `${caught} corruption${caught === 1 ? "" : "s"} caught` +
      ` (${trace.resend_requests} token${trace.resend_requests === 1 ? "" : "s"} asked again, ${trace.link_corrupt_frames} corrupt frame${trace.link_corrupt_frames === 1 ? "" : "s"})` : "no corruption caught"}`
    : `${trace.backend === "single_device" ? "single device" : trace.backend}`;
  const extra = [];
  if (trace.link_retransmits) extra.push(`${trace.link_retransmits} link retransmits`);
  if (trace.steps_dropped) extra.push(`${trace.steps_dropped} later steps not kept`);
  panel.append(h("div", { class: "trace-foot" },
    h("span", { class: caught ? "validation caught" : "validation", text: level }),
    extra.length ? h("span", { class: "muted", text: extra.join(" · ") }) : null,
    h("a", { href: `/v1/traces/${encodeURIComponent(requestId)}`, target: "_blank", rel: "noopener", class: "trace-link",
      text: "full trace" })));
  return panel;
}
