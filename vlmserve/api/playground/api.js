// Talking to the server: JSON calls and the streamed chat completion (fetch + Server-Sent Events parsing).
// Nothing here touches the DOM.

/** An error the server answered with (its OpenAI error body's message), or a failure to reach it. */
export class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(apiKey, json) {
  const result = {};
  if (apiKey) result.Authorization = `Bearer ${apiKey}`;
  if (json) result["Content-Type"] = "application/json";
  return result;
}

async function errorFrom(response) {
  let message = `the server answered HTTP ${response.status}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      code = body.error.code || null;
    }
  } catch (_) {
    // not JSON (a proxy's page, say): the status line is all we can show
  }
  return new ApiError(message, response.status, code);
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`could not reach the server (${err.message})`);
  }
}

/** The ids of the served models. */
export async function listModels(apiKey) {
  const response = await send("v1/models", { headers: headers(apiKey, false) });
  if (!response.ok) throw await errorFrom(response);
  const body = await response.json();
  return body.data.map((card) => String(card.id));
}

/**
 * Split an SSE byte stream into the `data:` payloads of its events.
 * Events end with a blank line; a payload may span several `data:` lines; `:` lines are comments.
 */
export async function* sseData(body, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    if (signal && signal.aborted) reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

/**
 * POST a streamed chat completion. `handlers.onContent(text)` gets each piece of the answer,
 * `handlers.onToolCall(delta)` each tool-call delta (`{index, id?, function: {name?, arguments?}}`, OpenAI's
 * shape: a call's first delta names it, later ones add to its arguments), `handlers.onUsage(u)` the usage chunk,
 * `handlers.onFinish(reason)` the finish reason. Resolves when `[DONE]` arrives; rejects with an
 * ApiError (the server's message) or, after `signal` fires, an AbortError.
 */
export async function streamChat(body, apiKey, signal, handlers) {
  const response = await send("v1/chat/completions", {
    method: "POST", headers: headers(apiKey, true), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorFrom(response);
  for await (const data of sseData(response.body, signal)) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(String(chunk.error.message), 200, chunk.error.code || null);
    if (chunk.usage) handlers.onUsage(chunk.usage);
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) handlers.onContent(choice.delta.content);
      for (const call of (choice.delta && choice.delta.tool_calls) || []) handlers.onToolCall(call);
      if (choice.finish_reason) handlers.onFinish(choice.finish_reason);
    }
  }
  throw new ApiError("the stream ended before [DONE]: the server closed the connection");
}
