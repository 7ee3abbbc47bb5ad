// The playground page: wires the controls to the conversation and the server.

import { ApiError, listModels, streamChat } from "./api.js";
import { Attachments } from "./attachments.js";
import { AnswerView, showUserTurn, userContent } from "./conversation.js";
import { PanelError, Panels } from "./panels.js";

const KEY_STORAGE = "vlmserve.apiKey"; // sessionStorage: gone when the tab closes, never sent anywhere else
const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), prompt: $("prompt"), send: $("send"), stop: $("stop"), model: $("model"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), detail: $("detail"), error: $("error"),
  keyPanel: $("key-panel"), apiKey: $("api-key"), fileInput: $("file-input"), sample: $("sample"),
  newChat: $("new-chat"), dropHint: $("drop-hint"),
};
const attachments = new Attachments($("attachments"), showError);
const panels = new Panels(document);
let messages = [];
let controller = null;

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function askForKey(message) {
  ui.keyPanel.hidden = false;
  showError(`This server needs an API key: enter it above. (The server said: ${message})`);
  ui.apiKey.focus();
}

async function loadModels() {
  try {
    const ids = await listModels(apiKey());
    ui.model.replaceChildren(...ids.map((id) => {
      const option = document.createElement("option");
      option.value = id;
      option.textContent = id;
      return option;
    }));
    clearError();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) askForKey(err.message);
    else showError(err.message);
  }
}

// The Tools and Response-format panels' fields (tools, tool_choice, response_format). Throws a PanelError, shown
// in its panel, when what the user typed there cannot be sent: the caller then sends nothing.
function extraRequestFields() {
  return panels.requestFields();
}

function requestBody(history, extra) {
  const body = {
    model: ui.model.value, messages: history, stream: true, stream_options: { include_usage: true }, ...extra,
  };
  const temperature = Number.parseFloat(ui.temperature.value);
  const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

/** The panels' fields, or null (with the message shown) when a panel holds what cannot be sent. */
function panelFields() {
  try {
    return extraRequestFields();
  } catch (err) {
    if (!(err instanceof PanelError)) throw err;
    showError(err.message);
    return null;
  }
}

async function sendTurn() {
  if (controller) return;
  const text = ui.prompt.value.trim();
  if (!text && !attachments.images.length) return;
  if (!ui.model.value) {
    showError("no model to talk to yet: the model list did not load");
    return;
  }
  clearError();
  const extra = panelFields();
  if (extra === null) return; // the prompt and images stay in the composer
  const images = attachments.take();
  ui.prompt.value = "";
  // "New chat" replaces `messages`: a turn still finishing then lands in the conversation it belongs to
  const history = messages;
  history.push({ role: "user", content: userContent(text, images, ui.detail.value) });
  const turn = showUserTurn(ui.log, text, images);
  await answerTurn(history, extra, (err, answer) => failTurn(err, { history, turn, answer, text, images }));
}

/** Stream the model's answer to `history` into a new answer view; `onRefused(err, answer)` if the server refuses. */
async function answerTurn(history, extra, onRefused) {
  const answer = new AnswerView(ui.log);
  controller = new AbortController();
  setBusy(true);
  try {
    await streamChat(requestBody(history, extra), apiKey(), controller.signal, {
      onContent: (piece) => answer.append(piece),
      onToolCall: (delta) => answer.addToolCall(delta),
      onUsage: (usage) => { answer.usage = usage; },
      onFinish: (reason) => { answer.finishReason = reason; },
    });
    if (extra.response_format) answer.showAsJson();
    answer.finish("done");
    history.push(answer.message());
    if (answer.toolCalls.length) answer.askForToolResults((results) => sendToolResults(history, results));
  } catch (err) {
    if (err.name === "AbortError") {
      answer.finish("stopped", "stopped");
      history.push({ role: "assistant", content: answer.content });
    } else {
      onRefused(err, answer);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
}

/** The user's results of the answer's tool calls, as `tool` messages; the model then answers on. */
async function sendToolResults(history, results) {
  if (controller || history !== messages) return; // busy, or that conversation was replaced by "New chat"
  clearError();
  const extra = panelFields();
  if (extra === null) return;
  history.push(...results);
  await answerTurn(history, extra, (err, answer) => {
    history.splice(history.length - results.length, results.length);
    answer.finish("error", "not answered");
    showError(err.message);
  });
}

/** A turn the server refused: out of the history, back into the composer to fix and send again. */
function failTurn(err, { history, turn, answer, text, images }) {
  history.pop();
  turn.classList.add("failed");
  answer.finish("error", "not answered");
  ui.prompt.value = text;
  images.forEach((image) => attachments.add(image));
  if (err instanceof ApiError && err.status === 401) askForKey(err.message);
  else showError(err.message);
}

function newChat() {
  if (controller) controller.abort();
  messages = [];
  ui.log.replaceChildren();
  clearError();
}

async function addSample() {
  const seed = Math.floor(Math.random() * 1_000_000);
  try {
    const response = await fetch(`playground/sample.png?seed=${seed}`);
    if (!response.ok) throw new ApiError(`could not draw a sample image (HTTP ${response.status})`);
    const file = new File([await response.blob()], `sample-${seed}.png`, { type: "image/png" });
    await attachments.addFiles([file]);
  } catch (err) {
    showError(err.message);
  }
}

function hasFiles(event) {
  return event.dataTransfer && Array.from(event.dataTransfer.types).includes("Files");
}

function wireFiles() {
  ui.fileInput.addEventListener("change", async () => {
    await attachments.addFiles(Array.from(ui.fileInput.files));
    ui.fileInput.value = "";
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    ui.dropHint.hidden = false;
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) ui.dropHint.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    ui.dropHint.hidden = true;
    attachments.addFiles(Array.from(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (!files.some((file) => file.type.startsWith("image/"))) return;
    event.preventDefault();
    attachments.addFiles(files);
  });
}

function wire() {
  ui.send.addEventListener("click", sendTurn);
  ui.stop.addEventListener("click", () => controller && controller.abort());
  ui.newChat.addEventListener("click", newChat);
  ui.sample.addEventListener("click", addSample);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendTurn();
    }
  });
  ui.apiKey.value = apiKey();
  const useKey = () => {
    sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value.trim());
    loadModels();
  };
  ui.apiKey.addEventListener("change", useKey);
  ui.keyPanel.addEventListener("submit", (event) => {
    event.preventDefault(); // nothing is posted anywhere: the key stays in this tab
    useKey();
  });
  if (apiKey()) ui.keyPanel.hidden = false;
  wireFiles();
}

wire();
loadModels();
