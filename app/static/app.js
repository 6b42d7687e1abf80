// Page start-up: the tabs, the served-model panel, and wiring the Generate, Chat and Train tabs together.

import { ADMIN_TOKEN, API_KEY, ApiError, api, describe, fmt, store } from "./api.js";
import { initChat } from "./chat.js";
import { initGenerate } from "./generate.js";
import { initTrain } from "./train.js";

const $ = (id) => document.getElementById(id);

// -- tabs (WAI-ARIA tabs pattern: arrow keys move between tabs, Tab moves into the panel) -------------------
const tabs = [...document.querySelectorAll('[role="tab"]')];
const onShow = {};

function selectTab(tab, focus = false) {
  for (const t of tabs) {
    const active = t === tab;
    t.setAttribute("aria-selected", String(active));
    t.tabIndex = active ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !active;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.id.replace("tab-", "")}`);
  if (onShow[tab.id]) onShow[tab.id]();
}

for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const shown = tabs.filter((t) => !t.hidden); // the Chat tab is hidden for a model without a template
    const i = shown.indexOf(tab);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: shown.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    selectTab(shown[(next + shown.length) % shown.length], true);
  });
}

// -- the served model ------------------------------------------------------------------------------------
const modelInfo = $("model-info");
const modelMsg = $("model-msg");

function showModelMessage(text, kind = "") {
  modelMsg.textContent = text;
  modelMsg.hidden = !text;
  modelMsg.classList.toggle("error", kind === "error");
}

// Chat mode only for a model with a chat template (without one /v1/chat/completions answers 400).
function showChat(available) {
  const tab = $("tab-chat");
  tab.hidden = !available;
  if (!available && tab.getAttribute("aria-selected") === "true") selectTab($("tab-generate"));
}

let modelRequest = 0; // refreshes can overlap (a key typed, a checkpoint loaded): only the latest may write

async function refreshModel() {
  const mine = ++modelRequest;
  let info;
  let size = "— (admin token shows it)";
  try {
    info = await api("/info", { token: store.get(API_KEY) });
    // The size on disk comes from the admin API's checkpoint listing: only with an admin token.
    const token = store.get(ADMIN_TOKEN);
    if (token) {
      size = "—";
      try {
        const { data } = await api("/admin/checkpoints", { token });
        const served = data.find((ck) => ck.serving);
        if (served) size = fmt.bytes(served.size_bytes);
      } catch {
        /* not an admin after all: the size stays unknown */
      }
    }
  } catch (err) {
    if (mine !== modelRequest) return;
    modelInfo.hidden = true;
    showChat(false);
    if (err instanceof ApiError && err.status === 401) {
      // /info sits behind the API key when the server has keys; say where to enter one.
      showModelMessage("This server needs an API key to show model details. Enter it under Generate → API key.");
    } else if (err instanceof ApiError && err.status === 503) {
      showModelMessage("No model is loaded yet. Train one in the Train tab, then load its checkpoint.");
    } else {
      showModelMessage(describe(err), "error");
    }
    return;
  }
  if (mine !== modelRequest) return;
  const c = info.config || {};
  const meta = info.meta || {};
  const trained = [
    meta.step != null ? `${meta.step} steps` : "",
    meta.val_loss != null ? `val loss ${fmt.loss(meta.val_loss)}` : "",
  ];
  $("model-name").textContent = info.model;
  $("model-path").textContent = info.checkpoint;
  $("model-params").textContent = fmt.count(info.parameters);
  $("model-size").textContent = size;
  $("model-context").textContent = `${info.context_length} tokens`;
  $("model-shape").textContent =
    `${c.n_layer} layers × ${c.n_head} heads × ${c.n_embd} wide, vocabulary ${fmt.count(c.vocab_size)}`;
  $("model-trained").textContent = trained.filter(Boolean).join(", ") || "—";
  $("model-device").textContent = `${info.device}, ${info.dtype}`;
  modelInfo.hidden = false;
  showChat(info.chat_template === true);
  showModelMessage("");
}

$("model-refresh").addEventListener("click", refreshModel);

// -- start -------------------------------------------------------------------------------------------------
initGenerate({ onApiKeyChange: refreshModel });
initChat({
  // A missing or wrong key: the key field lives on the Generate tab; take the user there.
  onAuthError: () => {
    selectTab($("tab-generate"));
    $("key-details").open = true;
    $("api-key").focus();
  },
});
const train = initTrain({
  isVisible: () => !$("panel-train").hidden,
  onModelChange: refreshModel,
});
onShow["tab-train"] = () => train.show();

const initial = tabs.find((t) => t.id === `tab-${location.hash.slice(1)}`) || tabs[0];
selectTab(initial);
// The page opened at #chat shows Chat at once; refreshModel() then hides it if the model has no template.
if (initial.id === "tab-chat") initial.hidden = false;
refreshModel();
document.documentElement.dataset.ready = "true"; // the page's scripts have run (tests wait for this)
