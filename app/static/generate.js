// The Generate tab: POST /v1/generate with `stream: true` and show the tokens as they arrive.

import { API_KEY, ApiError, describe, fromEnvelope, readSSE, request, store } from "./api.js";

const $ = (id) => document.getElementById(id);

// "\n" typed in a stop-string box means a newline: nobody can type a bare newline stop string otherwise.
function unescape(text) {
  return text.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
}

// A number field's value, or undefined when empty (so the server's default applies). A value the browser
// cannot parse as a number is sent as the text typed, so the server's 422 names the field.
function numberField(id, parse = Number) {
  const input = $(id);
  if (input.validity && input.validity.badInput) return input.value || "not a number";
  if (input.value.trim() === "") return undefined;
  return parse(input.value);
}

export function initGenerate({ onApiKeyChange }) {
  const form = $("gen-form");
  const prompt = $("prompt");
  const startButton = $("gen-start");
  const stopButton = $("gen-stop");
  const output = $("gen-output");
  const echo = $("gen-prompt");
  const textNode = document.createTextNode("");
  $("gen-text").append(textNode);
  const errorBox = $("gen-error");
  const status = $("gen-status");
  const keyInput = $("api-key");
  const keyDetails = $("key-details");
  const stat = { ttft: $("stat-ttft"), tps: $("stat-tps"), tokens: $("stat-tokens"), finish: $("stat-finish") };

  let controller = null; // the AbortController of the request in flight, if any

  keyInput.value = store.get(API_KEY);
  if (keyInput.value) keyDetails.open = true;
  keyInput.addEventListener("change", () => {
    store.set(API_KEY, keyInput.value.trim());
    onApiKeyChange();
  });
  $("api-key-forget").addEventListener("click", () => {
    keyInput.value = "";
    store.set(API_KEY, "");
    onApiKeyChange();
  });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  // Ctrl+Enter (Cmd+Enter on a Mac) from any field of the form, the prompt box included.
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      start();
    }
  });
  // Aborting the fetch closes the connection; the server notices and frees the request's KV slot.
  stopButton.addEventListener("click", () => controller && controller.abort());

  // The JSON schema box: empty means free text; otherwise its JSON goes as `json_schema` (throws if not JSON).
  function schemaField() {
    const text = $("json-schema").value.trim();
    if (!text) return undefined;
    try {
      return JSON.parse(text);
    } catch {
      throw new Error("The JSON schema is not valid JSON.");
    }
  }

  function body() {
    const stops = $("stop").value.split("\n").filter((s) => s !== "").map(unescape);
    const seed = numberField("seed", (v) => Number.parseInt(v, 10));
    const out = {
      prompt: prompt.value,
      max_new_tokens: numberField("max-tokens", (v) => Number.parseInt(v, 10)),
      temperature: numberField("temperature"),
      top_k: numberField("top-k", (v) => Number.parseInt(v, 10)),
      top_p: numberField("top-p"),
      seed,
      stop: stops.length === 0 ? undefined : stops.length === 1 ? stops[0] : stops,
      json_schema: schemaField(),
      stream: true,
    };
    // JSON.stringify drops undefined fields: the server then uses its defaults.
    return out;
  }

  function setState(state) {
    output.dataset.state = state;
    const busy = state === "streaming";
    if (!busy) controller = null;
    output.setAttribute("aria-busy", String(busy));
    // The Stop button is disabled when the stream ends; do not leave keyboard focus on a disabled button.
    // Read where focus is before disabling: some browsers blur a button as it is disabled.
    const stopHadFocus = document.activeElement === stopButton;
    startButton.disabled = busy;
    stopButton.disabled = !busy;
    if (!busy && stopHadFocus) startButton.focus();
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  async function start() {
    if (controller) return; // one generation at a time from this page
    showError("");
    if (!prompt.value) {
      showError("Enter a prompt first.");
      prompt.focus();
      return;
    }
    let payload;
    try {
      payload = body();
    } catch (err) {
      showError(err.message);
      $("json-schema").focus();
      return;
    }
    echo.textContent = payload.prompt;
    textNode.data = "";
    for (const node of Object.values(stat)) node.textContent = "—";
    status.textContent = "Generating…";
    setState("streaming");

    controller = new AbortController();
    const t0 = performance.now();
    let tFirst = null;
    let tokens = 0;
    let finish = null;
    try {
      const response = await request("/v1/generate", {
        method: "POST", json: payload, token: store.get(API_KEY), signal: controller.signal,
      });
      await readSSE(response, (event) => {
        if (event.event === "token") {
          const token = JSON.parse(event.data);
          const now = performance.now();
          if (tFirst === null) {
            tFirst = now;
            stat.ttft.textContent = `${Math.round(tFirst - t0)} ms`;
          }
          tokens += 1;
          textNode.appendData(token.text);
          stat.tokens.textContent = String(tokens);
          // Decode speed: tokens after the first over the time since the first (TTFT is shown apart).
          if (tokens > 1) stat.tps.textContent = ((tokens - 1) / ((now - tFirst) / 1000)).toFixed(1);
        } else if (event.event === "done") {
          const done = JSON.parse(event.data);
          finish = done.finish_reason;
          // The server's text is authoritative (a stop string may have trimmed what was already shown).
          textNode.data = done.text;
          stat.tokens.textContent = String(done.usage ? done.usage.completion_tokens : tokens);
          if (done.timings && done.timings.tokens_per_s) stat.tps.textContent = done.timings.tokens_per_s.toFixed(1);
        } else if (event.event === "error") {
          throw fromEnvelope(0, JSON.parse(event.data)) || new Error(event.data);
        }
      });
      if (finish === null) throw new Error("the stream ended before the generation finished");
      stat.finish.textContent = finish;
      status.textContent = `Done: ${tokens} tokens, finish reason ${finish}.`;
      setState("done");
    } catch (err) {
      if (err && err.name === "AbortError") {
        stat.finish.textContent = "stopped";
        status.textContent = "Stopped.";
        setState("stopped");
      } else {
        showError(describe(err));
        status.textContent = "Generation failed.";
        setState("error");
        // A missing or wrong key: open the key field so the fix is one keystroke away.
        if (err instanceof ApiError && err.status === 401) {
          keyDetails.open = true;
          keyInput.focus();
        }
      }
    }
  }
}
