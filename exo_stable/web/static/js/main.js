// Boots the page: the model's name, the API key dialog, the Chat and Cluster tabs.

import { AuthError, apiKey, getJSON, setApiKey } from "./api.js";
import { Chat, openTrace } from "./chat.js";
import { ClusterView } from "./cluster.js";

const $ = (id) => document.getElementById(id);
let model = "";
let asking = null;

/** Ask for the API key (once at a time); resolves when one that the node accepts is saved. */
function askKey() {
  if (asking) return asking;
  const dialog = $("key-dialog");
  asking = new Promise((resolve) => {
    $("key-error").hidden = !apiKey();
    $("key-error").textContent = apiKey() ? "The saved key was refused." : "";
    $("key-form").onsubmit = async (e) => {
      e.preventDefault();
      setApiKey($("key-input").value.trim());
      try {
        await loadModel();
        dialog.close();
        asking = null;
        resolve();
      } catch (err) {
        $("key-error").hidden = false;
        $("key-error").textContent = err.message;
      }
    };
    dialog.showModal();
  });
  return asking;
}

async function loadModel() {
  const models = await getJSON("/v1/models");
  model = models.data && models.data[0] ? models.data[0].id : "";
  $("model").textContent = model;
  $("model").title = `Model served by this node: ${model}`;
}

function tabs(chat, cluster) {
  const select = (name) => {
    $("tab-chat").setAttribute("aria-selected", String(name === "chat"));
    $("tab-cluster").setAttribute("aria-selected", String(name === "cluster"));
    $("chat-view").hidden = name !== "chat";
    $("cluster-view").hidden = name !== "cluster";
    $("menu").hidden = name !== "chat";
    if (name === "cluster") cluster.show(); else cluster.hide();
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  };
  $("tab-chat").addEventListener("click", () => select("chat"));
  $("tab-cluster").addEventListener("click", () => select("cluster"));
  window.addEventListener("hashchange", () => select(location.hash === "#cluster" ? "cluster" : "chat"));
  select(location.hash === "#cluster" ? "cluster" : "chat");
}

async function main() {
  $("menu").addEventListener("click", () => document.body.classList.toggle("drawer"));
  document.addEventListener("click", (e) => {
    const link = e.target.closest("a.trace-link");
    if (link) { e.preventDefault(); openTrace(link.getAttribute("href")).catch((err) => alert(err.message)); }
  });
  try {
    await loadModel();
  } catch (err) {
    if (err instanceof AuthError) await askKey();
    else $("model").textContent = `model unknown: ${err.message}`;
  }
  const chat = new Chat({ askKey, model: () => model });
  const cluster = new ClusterView($("cluster-view"), { askKey });
  tabs(chat, cluster);
  document.body.dataset.ready = "true";  // for tests and for anyone scripting the page
}

main();
