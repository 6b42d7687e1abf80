// The Chat tab: a conversation with the served model through POST /v1/chat/completions (`stream: true`).
//
// Only shown for a model with a chat template (GET /info says `chat_template`). The page keeps the message
// list; every send posts the whole conversation (the server is stateless), with the optional system prompt
// first. Model output is only ever set as text (textContent / Text nodes), never parsed as HTML.

import { API_KEY, ApiError, describe, fromEnvelope, readSSE, request, store } from "./api.js";

const $ = (id) => document.getElementById(id);

// A number field's value, or undefined when empty (the server's default applies); unparsable text goes as
// typed so the server's 422 names the field.
function numberField(id, parse = Number) {
  const input = $(id);
  if (input.validity && input.validity.badInput) return input.value || "not a number";
  if (input.value.trim() === "") return undefined;
  return parse(input.value);
}

// One turn of the log: <li data-role><span class="role">…</span><span class="content">…</span></li>.
function turnElement(role, text) {
  const item = document.createElement("li");
  item.className = "turn";
  item.dataset.role = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  item.append(label, content);
  return { item, content };
}

export function initChat({ onAuthError }) {
  const form = $("chat-form");
  const input = $("chat-input");
  const log = $("chat-log");
  const empty = $("chat-empty");
  const sendButton = $("chat-send");
  const stopButton = $("chat-stop");
  const errorBox = $("chat-error");
  const status = $("chat-status");
  const messages = []; // the conversation so far: {role: "user" | "assistant", content}
  let controller = null;

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send();
    }
  });
  stopButton.addEventListener("click", () => controller && controller.abort());
  $("chat-clear").addEventListener("click", clear);

  function clear() {
    if (controller) controller.abort();
    messages.length = 0;
    log.replaceChildren();
    empty.hidden = false;
    showError("");
    status.textContent = "Conversation cleared.";
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  // `state` is the log's data-state: streaming, then done, stopped or error (what tests and CSS read).
  function setBusy(busy, state = busy ? "streaming" : "idle") {
    log.dataset.state = state;
    const stopHadFocus = document.activeElement === stopButton; // read before disabling: browsers may blur it
    log.setAttribute("aria-busy", String(busy));
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    if (!busy) controller = null;
    if (!busy && stopHadFocus) input.focus();
  }

  function body() {
    const system = $("chat-system").value.trim();
    return {
      messages: [...(system ? [{ role: "system", content: system }] : []), ...messages],
      max_tokens: numberField("chat-max-tokens", (v) => Number.parseInt(v, 10)),
      temperature: numberField("chat-temperature"),
      stream: true,
    };
  }

  function append(role, text) {
    const turn = turnElement(role, text);
    log.append(turn.item);
    empty.hidden = true;
    return turn;
  }

  async function send() {
    if (controller) return; // one reply at a time
    showError("");
    const text = input.value;
    if (!text.trim()) {
      showError("Type a message first.");
      input.focus();
      return;
    }
    messages.push({ role: "user", content: text });
    const userTurn = append("user", text);
    const payload = body();
    const reply = append("assistant", "");
    const replyText = document.createTextNode("");
    reply.content.replaceChildren(replyText);
    input.value = "";
    status.textContent = "The model is answering…";
    controller = new AbortController();
    setBusy(true);
    let finish = null;
    let outcome = "stopped"; // an abort by Clear ends as stopped too
    try {
      const response = await request("/v1/chat/completions", {
        method: "POST", json: payload, token: store.get(API_KEY), signal: controller.signal,
      });
      await readSSE(response, (event) => {
        if (event.data === "[DONE]") return;
        const chunk = JSON.parse(event.data);
        if (chunk.error) throw fromEnvelope(0, chunk); // an error mid-stream comes as the envelope
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) replyText.appendData(choice.delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
      if (finish === null) throw new Error("the stream ended before the answer finished");
      messages.push({ role: "assistant", content: replyText.data });
      status.textContent = `Answered (finish reason ${finish}).`;
      outcome = "done";
    } catch (err) {
      if (err && err.name === "AbortError" && messages.at(-1) === payload.messages.at(-1)) {
        // Stopped by the user: the partial answer stays, as part of the conversation.
        messages.push({ role: "assistant", content: replyText.data });
        status.textContent = "Stopped.";
      } else if (!(err && err.name === "AbortError")) {
        // Failed: take the turn back out, and give the message back to the input to retry.
        messages.pop();
        userTurn.item.remove();
        reply.item.remove();
        empty.hidden = messages.length > 0;
        input.value = text;
        showError(describe(err));
        status.textContent = "The message failed.";
        outcome = "error";
        if (err instanceof ApiError && err.status === 401) onAuthError();
      }
    } finally {
      setBusy(false, outcome);
    }
  }

  return { clear };
}
