// The node's own API: the key (asked for when the node requires one, kept in localStorage), JSON GETs,
// and the chat completion stream (server-sent events over fetch, so that aborting it cancels the request).

const KEY = "exo-stable.api-key";

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const apiKey = () => localStorage.getItem(KEY) || "";
export const setApiKey = (key) => (key ? localStorage.setItem(KEY, key) : localStorage.removeItem(KEY));

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch { /* not JSON: the status line says enough */ }
  if (response.status === 401) return new AuthError(message);
  return new ApiError(response.status, message);
}

/** GET `path` as JSON; `also`: statuses besides 2xx whose body is an answer (/health's 503: not ready, and why). */
export async function getJSON(path, { signal, also = [] } = {}) {
  const response = await fetch(path, { headers: headers(), signal, cache: "no-store" });
  if (!response.ok && !also.includes(response.status)) throw await failure(response);
  return response.json();
}

/** Yield each event of a streamed chat completion; ends at `[DONE]`. Abort `signal` to cancel on the server. */
export async function* streamChat(body, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}
