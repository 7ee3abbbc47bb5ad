// The Tools and Response-format panels: what the user typed there, checked in the browser, as request fields.
// Nothing here sends anything: `requestFields()` either returns the fields or throws a PanelError, and the page
// then shows the message and sends nothing.

/** Input in a panel that cannot be sent; `panel` names it ("tools" or "format"). */
export class PanelError extends Error {
  constructor(panel, message) {
    super(message);
    this.panel = panel;
  }
}

const FUNCTION_NAME = /^[A-Za-z0-9_-]{1,64}$/; // what OpenAI accepts as a function name
const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

function parseJson(panel, label, text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new PanelError(panel, `${label} is not valid JSON: ${err.message}`);
  }
}

/** The tools array typed into the panel, checked in OpenAI's chat shape; null when the box is empty. */
export function parseTools(text) {
  if (!text.trim()) return null;
  const tools = parseJson("tools", "Tools", text);
  if (!Array.isArray(tools) || tools.length === 0) {
    throw new PanelError("tools", 'Tools must be a non-empty JSON array of {"type": "function", "function": ' +
                         '{"name": ..., "parameters": {...}}}');
  }
  tools.forEach((tool, i) => {
    const where = `tools[${i}]`;
    if (!isObject(tool) || tool.type !== "function" || !isObject(tool.function)) {
      throw new PanelError("tools", `${where} must be {"type": "function", "function": {...}}`);
    }
    if (typeof tool.function.name !== "string" || !FUNCTION_NAME.test(tool.function.name)) {
      throw new PanelError("tools", `${where}.function.name must be 1-64 letters, digits, _ or -`);
    }
    if (tool.function.parameters !== undefined && !isObject(tool.function.parameters)) {
      throw new PanelError("tools", `${where}.function.parameters must be a JSON Schema object`);
    }
  });
  return tools;
}

/** The chosen tool_choice in the request's shape ("auto", "none", "required" or a function by name). */
export function toolChoice(value) {
  if (value.startsWith("function:")) return { type: "function", function: { name: value.slice(9) } };
  return value;
}

/** The response_format for the chosen kind; `schemaText` is read only for json_schema. */
export function responseFormat(kind, schemaText) {
  if (kind === "json_object") return { type: "json_object" };
  if (kind !== "json_schema") return null;
  if (!schemaText.trim()) throw new PanelError("format", "JSON schema is empty: type a schema or pick another format");
  const schema = parseJson("format", "JSON schema", schemaText);
  if (!isObject(schema)) throw new PanelError("format", "JSON schema must be a JSON object");
  return { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
}

/** The two panels on the page: their controls, their error lines and the fields they add to a request. */
export class Panels {
  constructor(doc) {
    const $ = (id) => doc.getElementById(id);
    this.tools = $("tools-json");
    this.choice = $("tool-choice");
    this.toolsError = $("tools-error");
    this.format = $("format-kind");
    this.schema = $("schema-json");
    this.schemaRow = $("schema-row");
    this.formatError = $("format-error");
    this.tools.addEventListener("input", () => this.refreshChoices());
    this.format.addEventListener("change", () => { this.schemaRow.hidden = this.format.value !== "json_schema"; });
    this.schemaRow.hidden = true;
    this.refreshChoices();
  }

  /** Offer one "function: name" choice per tool while the box parses; keep the user's pick when still offered. */
  refreshChoices() {
    let names = [];
    try {
      names = (parseTools(this.tools.value) || []).map((tool) => tool.function.name);
      this.showError("tools", "");
    } catch (_) {
      return; // checked (with its message) when the user sends
    }
    const kept = this.choice.value;
    const options = ["auto", "none", "required", ...names.map((name) => `function:${name}`)];
    this.choice.replaceChildren(...options.map((value) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = value.startsWith("function:") ? `function: ${value.slice(9)}` : value;
      return option;
    }));
    this.choice.value = options.includes(kept) ? kept : "auto";
  }

  showError(panel, message) {
    const line = panel === "tools" ? this.toolsError : this.formatError;
    line.textContent = message;
    line.hidden = !message;
  }

  /** The request fields of both panels; throws PanelError (already shown in its panel) when one cannot be sent. */
  requestFields() {
    const fields = {};
    try {
      const tools = parseTools(this.tools.value);
      if (tools) Object.assign(fields, { tools, tool_choice: toolChoice(this.choice.value) });
      this.showError("tools", "");
      const format = responseFormat(this.format.value, this.schema.value);
      if (format) fields.response_format = format;
      this.showError("format", "");
    } catch (err) {
      if (err instanceof PanelError) this.showError(err.panel, err.message);
      throw err;
    }
    return fields;
  }

  /** Whether answers are asked for as JSON (then shown pretty-printed when they parse). */
  get wantsJson() {
    return this.format.value !== "none";
  }
}
