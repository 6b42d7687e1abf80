// Talking to the pocketgpt server: stored keys, fetch with the error envelope, server-sent events, formatting.
//
// Every API failure comes back as {"error": {"message", "type", "param", "code"}}; `api()` turns it into an
// ApiError so each caller can show the server's own message instead of a bare status code.

// -- keys -----------------------------------------------------------------------------------------------
// sessionStorage, not localStorage: a key survives reloading this tab but is gone when the tab closes, and
// no other tab or later visitor of this browser profile can read it.
export const API_KEY = "pocketgpt.apiKey";
export const ADMIN_TOKEN = "pocketgpt.adminToken";

export const store = {
  get(name) {
    try {
      return sessionStorage.getItem(name) || "";
    } catch {
      return ""; // storage disabled (private mode, sandboxed frame): keys then live in the input only
    }
  },
  set(name, value) {
    try {
      if (value) sessionStorage.setItem(name, value);
      else sessionStorage.removeItem(name);
    } catch {
      /* see get() */
    }
  },
};

// -- errors ---------------------------------------------------------------------------------------------
export class ApiError extends Error {
  constructor(status, message, { type = null, param = null, code = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// An ApiError from the envelope object itself (also what an SSE `error` event carries).
export function fromEnvelope(status, body, retryAfter = null) {
  const e = body && body.error;
  if (e && typeof e.message === "string") {
    return new ApiError(status, e.message, { type: e.type, param: e.param, code: e.code, retryAfter });
  }
  return null;
}

// Build an ApiError from a failed response. A body that is not the envelope (a proxy's HTML error page, say)
// still gives a readable line from the status.
export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON */
  }
  const retryAfter = response.headers.get("Retry-After");
  return (
    fromEnvelope(response.status, body, retryAfter) ||
    new ApiError(response.status, response.statusText || "unexpected response", { retryAfter })
  );
}

// One readable sentence for any error a request can end with.
export function describe(err) {
  if (err instanceof ApiError) {
    const where = err.param ? ` (field: ${err.param})` : "";
    switch (err.status) {
      case 401:
        return `Not authorised: ${err.message}`;
      case 403:
        return `Forbidden: ${err.message}`;
      case 413:
        return `Too large: ${err.message}`;
      case 422:
        return `Invalid request${where}: ${err.message}`;
      case 429: {
        const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
        return `The server is busy: ${err.message}.${wait}`;
      }
      case 0: // an error event inside a stream: no HTTP status of its own, the envelope's type says what
        return `Failed mid-stream (${err.type || "error"}): ${err.message}`;
      case 503:
        return `Unavailable: ${err.message}`;
      default:
        return `Error ${err.status}${where}: ${err.message}`;
    }
  }
  if (err && err.name === "AbortError") return "Stopped.";
  // fetch() rejects with a TypeError when the server cannot be reached at all.
  if (err instanceof TypeError) return `Cannot reach the server (${err.message}).`;
  return String((err && err.message) || err);
}

// -- fetch ----------------------------------------------------------------------------------------------
// fetch(path) with an optional bearer token and JSON body. Resolves to the Response for a 2xx, otherwise
// throws the ApiError from the envelope. `json` is sent as a JSON body, `body` as is (FormData).
export async function request(path, { method = "GET", token = "", json, body, signal, headers = {} } = {}) {
  const init = { method, signal, headers: { ...headers } };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body; // FormData: the browser sets the multipart boundary itself
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// request() and parse the JSON body.
export async function api(path, options) {
  const response = await request(path, options);
  return response.json();
}

// -- server-sent events ---------------------------------------------------------------------------------
// EventSource can neither POST (/v1/generate is a POST) nor send an Authorization header (the job event
// stream needs the admin token), so streams are read with fetch() and parsed here, per the SSE spec:
// fields `event`, `data` (several lines join with "\n"), `id`; lines starting with ":" are comments (the
// server's keep-alive pings); a blank line ends an event.
export class SSEParser {
  constructor() {
    this.lastId = "";
    this.event = "";
    this.data = [];
  }

  // Feed one line without its line ending; returns a finished {event, data, id} or null.
  line(text) {
    if (text === "") {
      if (this.data.length === 0) {
        this.event = "";
        return null;
      }
      const out = { event: this.event || "message", data: this.data.join("\n"), id: this.lastId };
      this.event = "";
      this.data = [];
      return out;
    }
    if (text.startsWith(":")) return null;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id") this.lastId = value;
    return null;
  }
}

// Read a text/event-stream response to its end, calling onEvent({event, data, id}) for each event. An
// exception thrown by onEvent (or an abort of the fetch's signal) stops reading and cancels the body, which
// closes the connection: that is how the server learns the client has gone and frees the request's slot.
export async function readSSE(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  let buffer = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let start = 0;
      for (let i = 0; i < buffer.length; i++) {
        const c = buffer[i];
        if (c !== "\n" && c !== "\r") continue;
        // A CR that ends the chunk may be the first half of a CRLF split across two chunks: wait for more.
        if (c === "\r" && i === buffer.length - 1) break;
        const event = parser.line(buffer.slice(start, i));
        if (c === "\r" && buffer[i + 1] === "\n") i++;
        start = i + 1;
        if (event) onEvent(event);
      }
      buffer = buffer.slice(start);
    }
    // The stream ended: a last line without its terminator still counts, then dispatch what is pending.
    if (buffer) {
      const event = parser.line(buffer.replace(/\r$/, ""));
      if (event) onEvent(event);
    }
    const last = parser.line("");
    if (last) onEvent(last);
    finished = true;
  } finally {
    if (!finished) reader.cancel().catch(() => {});
  }
}

// -- formatting -----------------------------------------------------------------------------------------
export const fmt = {
  // 1234567 -> "1.23 M"
  count(n) {
    if (n === null || n === undefined) return "—";
    const units = [
      [1e9, "B"],
      [1e6, "M"],
      [1e3, "k"],
    ];
    for (const [size, unit] of units) if (Math.abs(n) >= size) return `${(n / size).toPrecision(3)} ${unit}`;
    return String(n);
  },
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i++;
    }
    return `${i === 0 ? n : n.toPrecision(3)} ${units[i]}`;
  },
  // seconds -> "1 h 02 min", "3 min 05 s", "12 s"
  duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
    if (m) return `${m} min ${String(sec).padStart(2, "0")} s`;
    return `${sec} s`;
  },
  loss(x) {
    return x === null || x === undefined ? "—" : Number(x).toFixed(3);
  },
  number(x, digits = 1) {
    return x === null || x === undefined || !isFinite(x) ? "—" : Number(x).toFixed(digits);
  },
  time(epochSeconds) {
    if (!epochSeconds) return "—";
    return new Date(epochSeconds * 1000).toLocaleString(undefined, {
      month: "short",
      day: "numeric",
      hour: "2-digit",
      minute: "2-digit",
    });
  },
};
