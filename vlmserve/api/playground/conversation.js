// The conversation as shown and as sent. Model output is only ever set with textContent: an answer that holds
// markup (`<img src=x onerror=...>`) shows as those characters, never as elements.

import { thumbnail } from "./attachments.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** One streamed answer on screen: its text, its state (data-state) and, when done, its numbers. */
export class AnswerView {
  constructor(log) {
    this.node = element("article", "msg assistant");
    this.node.dataset.state = "waiting";
    this.text = element("div", "text");
    this.stats = element("div", "stats");
    this.node.append(element("div", "who", "assistant"), this.text, this.stats);
    log.append(this.node);
    this.content = "";
    this.started = performance.now();
    this.firstAt = null;
    this.usage = null;
    this.finishReason = null;
    this.toolCalls = []; // {id, name, arguments, card} in the order the answer made them
  }

  /** One streamed tool-call delta: a new call gets a card (name + arguments), later deltas extend its arguments. */
  addToolCall(delta) {
    // NOTE: no first-token time from here: the server sends a call once it is whole (its arguments parse), so
    // its arrival says when the call ended, and a token rate from it would be meaningless
    let call = this.toolCalls[delta.index];
    if (!call) {
      call = { id: "", name: "", arguments: "", card: toolCard() };
      this.toolCalls[delta.index] = call;
      this.node.insertBefore(call.card.node, this.stats);
    }
    const fn = delta.function || {};
    if (delta.id) call.id = delta.id;
    if (fn.name) call.name += fn.name;
    if (fn.arguments) call.arguments += fn.arguments;
    call.card.name.textContent = call.name;
    call.card.args.textContent = prettyJson(call.arguments) ?? call.arguments;
    this.node.dataset.state = "streaming";
  }

  /** Show the answer pretty-printed when it is JSON (data-json says whether it parsed). */
  showAsJson() {
    const pretty = prettyJson(this.content);
    this.node.dataset.json = pretty === null ? "invalid" : "valid";
    if (pretty === null) return;
    const block = element("pre", "text json", pretty);
    this.text.replaceWith(block);
    this.text = block;
  }

  /** The answer as an assistant message of the conversation (with its tool calls, if it made any). */
  message() {
    if (!this.toolCalls.length) return { role: "assistant", content: this.content };
    return {
      role: "assistant", content: this.content || null,
      tool_calls: this.toolCalls.map((c) => ({ id: c.id, type: "function",
                                               function: { name: c.name, arguments: c.arguments } })),
    };
  }

  /** Under the tool cards: one result box per call and a button that hands `send` the `tool` messages. */
  askForToolResults(send) {
    const form = element("div", "tool-results");
    const boxes = this.toolCalls.map((call) => {
      const box = element("textarea", "tool-result");
      box.rows = 2;
      box.placeholder = `Result of ${call.name} (sent as a tool message)`;
      call.card.node.append(box);
      return box;
    });
    const button = element("button", "send-tool-results", "Send tool result" + (boxes.length > 1 ? "s" : ""));
    button.type = "button";
    button.addEventListener("click", () => {
      button.disabled = true;
      boxes.forEach((box) => { box.disabled = true; });
      send(this.toolCalls.map((call, i) => ({ role: "tool", tool_call_id: call.id, content: boxes[i].value })));
    });
    const row = element("div", "buttons");
    row.append(button);
    form.append(row);
    this.node.insertBefore(form, this.stats);
  }

  append(piece) {
    if (this.firstAt === null) this.firstAt = performance.now();
    this.content += piece;
    this.text.textContent = this.content;
    this.node.dataset.state = "streaming";
    this.node.scrollIntoView({ block: "end" });
  }

  finish(state, note) {
    const ended = performance.now();
    this.node.dataset.state = state;
    const parts = [];
    const u = this.usage;
    if (u) {
      const details = u.prompt_tokens_details || {};
      parts.push(`prompt ${u.prompt_tokens} tokens (${details.image_tokens || 0} image, ` +
                 `${details.cached_tokens || 0} cached)`, `answer ${u.completion_tokens} tokens`);
    }
    if (this.firstAt !== null) {
      parts.push(`first token ${Math.round(this.firstAt - this.started)} ms`);
      // decode rate, as `vllm bench` counts it: tokens after the first over the time after the first
      if (u && u.completion_tokens > 1 && ended > this.firstAt) {
        parts.push(`${((u.completion_tokens - 1) / ((ended - this.firstAt) / 1000)).toFixed(1)} tokens/s`);
      }
    }
    if (this.finishReason) parts.push(`finish: ${this.finishReason}`);
    if (note) parts.push(note);
    this.stats.textContent = parts.join(" \u00b7 ");
  }
}

function toolCard() {
  const node = element("div", "tool-call");
  const name = element("span", "tool-name");
  const args = element("pre", "tool-args");
  node.append(element("span", "who", "tool call "), name, args);
  return { node, name, args };
}

/** `text` re-indented when it is JSON, else null. */
function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch (_) {
    return null;
  }
}

/** A user turn on screen: its images as thumbnails, then its text. */
export function showUserTurn(log, text, images) {
  const node = element("article", "msg user");
  node.append(element("div", "who", "you"));
  if (images.length) {
    const strip = element("div", "thumbs");
    for (const image of images) strip.append(thumbnail(image));
    node.append(strip);
  }
  node.append(element("div", "text", text));
  log.append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

/** The OpenAI content of a user turn: every image (with the chosen detail), then the text. */
export function userContent(text, images, detail) {
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url, detail } }));
  if (text) parts.push({ type: "text", text });
  return parts;
}
