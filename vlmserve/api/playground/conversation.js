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
