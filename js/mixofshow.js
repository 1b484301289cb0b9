// Load ED-LoRA and LoRA as Concept show the concept tokens they define, as HTML text (a DOM widget
// reads the same on the classic canvas and in Nodes 2.0; a disabled text widget is drawn empty):
// before a run the file's tokens (asked of the backend), after a run what the node reported.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TOKENS_SHOWN, tokensOfFile, widgetValue } from "./lib/concepts.js";
import { addStyle, el } from "./lib/dom.js";
import { EDLORA_LOADER, LORA_CONCEPT } from "./lib/names.js";

addStyle("mixofshow-tokens-style", `
.mixofshow-tokens { box-sizing: border-box; width: 100%; padding: 4px 8px; border-radius: 6px; background: #1c2430;
  color: #d9e8ff; font: 13px/1.4 monospace; overflow-wrap: anywhere; overflow: hidden; }
.mixofshow-tokens .mixofshow-tokens-title { color: #8aa0b8; font: 11px sans-serif; margin-right: 6px; }
.mixofshow-tokens.mixofshow-empty .mixofshow-tokens-value { color: #8a8a8a; font-style: italic;
  font-family: sans-serif; }
`);

const TITLES = { [EDLORA_LOADER]: "tokens", [LORA_CONCEPT]: "trigger words" };

function addTokensWidget(node) {
  const value = el("span", { className: "mixofshow-tokens-value" });
  const element = el("div", { className: "mixofshow-tokens mixofshow-empty" },
    [el("span", { className: "mixofshow-tokens-title", textContent: TITLES[node.comfyClass] }), value]);
  const widget = node.addDOMWidget("concept_tokens", "mixofshow_tokens", element, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 30, getMaxHeight: () => 72,
  });
  widget.serialize = false; // not in widgets_values: saved workflows keep their layout
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  return (text, placeholder = "") => {
    value.textContent = text || placeholder;
    element.classList.toggle("mixofshow-empty", !text);
  };
}

/** Calls `onChange` after the user (or a workflow load) changes widget `name`. */
function onWidgetChange(node, name, onChange) {
  const widget = node.widgets?.find((w) => w.name === name);
  if (!widget) return;
  const callback = widget.callback;
  widget.callback = function () {
    const result = callback?.apply(this, arguments);
    onChange();
    return result;
  };
}

function setUpLoader(node) {
  const show = addTokensWidget(node);
  const refresh = () => {
    if (node[TOKENS_SHOWN]) return show(node[TOKENS_SHOWN].join(" "));
    if (node.comfyClass === LORA_CONCEPT) {
      return show(String(widgetValue(node, "trigger_words") ?? "").trim(), "none yet: type the LoRA's trigger words");
    }
    const name = widgetValue(node, "edlora_name");
    show("", name ? "reading the file…" : "no ED-LoRA file chosen");
    tokensOfFile(api, name).then((tokens) => {
      if (!node[TOKENS_SHOWN] && widgetValue(node, "edlora_name") === name) {
        show(tokens.join(" "), "no tokens found (see the browser console)");
      }
    });
  };
  const forget = () => {
    delete node[TOKENS_SHOWN]; // the last run reported another file's tokens
    refresh();
  };
  onWidgetChange(node, "edlora_name", forget);
  onWidgetChange(node, "trigger_words", forget);
  node.mixofshowRefreshTokens = refresh;
  setTimeout(refresh); // after a workflow load has set the widget values
}

app.registerExtension({
  name: "mixofshow.concepts",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData.name in TITLES)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      setUpLoader(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.mixofshowRefreshTokens?.();
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      // the node's own tokens (the file's), not the whole chain's: message.text = [tokens]
      const text = String(message?.text?.[0] ?? "").trim();
      this[TOKENS_SHOWN] = this.comfyClass === LORA_CONCEPT ? [text] : text.split(/\s+/).filter(Boolean);
      this.mixofshowRefreshTokens?.();
    };
  },
});
