// Markdown to safe HTML: marked parses, DOMPurify sanitizes (the model's text is untrusted), highlight.js
// colours the code blocks afterwards (it only reads text and writes escaped spans).

import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.js";
import hljs from "../vendor/highlight/core.js";
import bash from "../vendor/highlight/languages/bash.js";
import c from "../vendor/highlight/languages/c.js";
import cpp from "../vendor/highlight/languages/cpp.js";
import css from "../vendor/highlight/languages/css.js";
import diff from "../vendor/highlight/languages/diff.js";
import go from "../vendor/highlight/languages/go.js";
import java from "../vendor/highlight/languages/java.js";
import javascript from "../vendor/highlight/languages/javascript.js";
import json from "../vendor/highlight/languages/json.js";
import markdown from "../vendor/highlight/languages/markdown.js";
import plaintext from "../vendor/highlight/languages/plaintext.js";
import python from "../vendor/highlight/languages/python.js";
import rust from "../vendor/highlight/languages/rust.js";
import shell from "../vendor/highlight/languages/shell.js";
import sql from "../vendor/highlight/languages/sql.js";
import typescript from "../vendor/highlight/languages/typescript.js";
import xml from "../vendor/highlight/languages/xml.js";
import yaml from "../vendor/highlight/languages/yaml.js";

const languages = { bash, c, cpp, css, diff, go, java, javascript, json, markdown, plaintext, python, rust, shell,
  sql, typescript, xml, yaml };
for (const [name, definition] of Object.entries(languages)) hljs.registerLanguage(name, definition);
hljs.configure({ ignoreUnescapedHTML: true });

const marked = new Marked({ gfm: true, breaks: true });

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {  // links leave the page in a new tab, without an opener or a referrer
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Render `text` (markdown, possibly still streaming) into `el`. */
export function renderMarkdown(el, text) {
  const html = marked.parse(text, { async: false });
  el.innerHTML = DOMPurify.sanitize(html, { FORBID_TAGS: ["style", "form", "input", "button"], FORBID_ATTR: ["style"] });
  for (const block of el.querySelectorAll("pre code")) {
    const lang = [...block.classList].find((c) => c.startsWith("language-"));
    if (lang && !hljs.getLanguage(lang.slice(9))) block.classList.replace(lang, "language-plaintext");
    hljs.highlightElement(block);
  }
}
