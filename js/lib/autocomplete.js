// The concept-token popup: typing "<" in a prompt textarea lists the tokens its node can use.
// One popup for the page, placed at the caret; arrows + Enter/Tab pick, Escape closes.
import { addStyle, el } from "./dom.js";
import { applyCompletion, completionQuery, matchCandidates } from "./tokens.js";

addStyle("mixofshow-autocomplete-style", `
.mixofshow-autocomplete { position: fixed; z-index: 100000; min-width: 160px; max-height: 220px; overflow-y: auto;
  background: #222; color: #ddd; border: 1px solid #555; border-radius: 6px; font: 12px monospace;
  box-shadow: 0 4px 14px rgba(0,0,0,.5); padding: 2px 0; }
.mixofshow-autocomplete .mixofshow-autocomplete-item { padding: 3px 10px; cursor: pointer; white-space: nowrap;
  display: flex; gap: 10px; justify-content: space-between; }
.mixofshow-autocomplete .mixofshow-autocomplete-item.mixofshow-active,
.mixofshow-autocomplete .mixofshow-autocomplete-item:hover { background: #3b5b8c; color: #fff; }
.mixofshow-autocomplete .mixofshow-autocomplete-detail { opacity: .6; font-family: sans-serif; }
`);

const MIRRORED = ["boxSizing", "width", "fontFamily", "fontSize", "fontWeight", "lineHeight", "letterSpacing",
  "paddingTop", "paddingRight", "paddingBottom", "paddingLeft", "borderTopWidth", "borderLeftWidth", "wordSpacing",
  "tabSize"];

/** Viewport position just below the caret of `textarea` (works when the textarea is CSS-scaled). */
function caretPoint(textarea) {
  const style = getComputedStyle(textarea);
  const mirror = el("div", { style: { position: "absolute", visibility: "hidden", whiteSpace: "pre-wrap",
    wordWrap: "break-word", top: "0", left: "-9999px" } });
  for (const prop of MIRRORED) mirror.style[prop] = style[prop];
  mirror.textContent = textarea.value.slice(0, textarea.selectionStart);
  const marker = el("span", { textContent: "\u200b" });
  mirror.append(marker);
  document.body.append(mirror);
  const x = marker.offsetLeft;
  const y = marker.offsetTop + marker.offsetHeight - textarea.scrollTop;
  mirror.remove();
  const rect = textarea.getBoundingClientRect();
  const scale = textarea.offsetWidth ? rect.width / textarea.offsetWidth : 1;
  return { x: rect.left + Math.min(x, textarea.offsetWidth) * scale,
    y: rect.top + Math.min(y, textarea.offsetHeight) * scale };
}

class Popup {
  constructor() {
    this.element = el("div", { className: "mixofshow-autocomplete", style: { display: "none" } });
    document.body.append(this.element);
    this.items = [];
    this.active = 0;
    this.target = null;
  }

  get visible() {
    return this.element.style.display !== "none";
  }

  show(textarea, query, items) {
    this.target = textarea;
    this.query = query;
    this.items = items;
    this.active = 0;
    this.element.replaceChildren(...items.map((item, i) => el("div", {
      className: "mixofshow-autocomplete-item",
      dataset: { index: String(i) },
      onpointerdown: (e) => {
        e.preventDefault(); // keep the focus in the textarea
        e.stopPropagation();
        this.pick(i);
      },
    }, [el("span", { textContent: item.text }), el("span", { className: "mixofshow-autocomplete-detail",
      textContent: item.detail ?? "" })])));
    const { x, y } = caretPoint(textarea);
    Object.assign(this.element.style, { display: "block", left: `${Math.round(x)}px`, top: `${Math.round(y + 2)}px` });
    this.highlight();
  }

  highlight() {
    [...this.element.children].forEach((child, i) =>
      child.classList.toggle("mixofshow-active", i === this.active));
    this.element.children[this.active]?.scrollIntoView({ block: "nearest" });
  }

  move(step) {
    this.active = (this.active + step + this.items.length) % this.items.length;
    this.highlight();
  }

  pick(index = this.active) {
    const textarea = this.target;
    const item = this.items[index];
    this.hide();
    if (!textarea || !item) return;
    const result = applyCompletion(textarea.value, this.query.start, textarea.selectionStart, item.text);
    textarea.value = result.text;
    textarea.setSelectionRange(result.caret, result.caret);
    // the widgets (classic and Vue) take their value from the input event
    textarea.dispatchEvent(new Event("input", { bubbles: true }));
    textarea.dispatchEvent(new Event("change", { bubbles: true }));
  }

  hide() {
    this.element.style.display = "none";
    this.target = null;
  }
}

let popup = null;

async function update(textarea, candidates) {
  const query = completionQuery(textarea.value, textarea.selectionStart);
  if (!query || textarea.selectionStart !== textarea.selectionEnd) {
    if (popup?.target === textarea) popup.hide();
    return;
  }
  const items = matchCandidates(await candidates(), query.prefix);
  const now = completionQuery(textarea.value, textarea.selectionStart);
  if (!now || now.prefix !== query.prefix || document.activeElement !== textarea) return; // typed on meanwhile
  popup ??= new Popup();
  if (items.length) popup.show(textarea, query, items);
  else if (popup.target === textarea) popup.hide();
}

function onKey(event, textarea) {
  if (!popup?.visible || popup.target !== textarea) return;
  const keys = { ArrowDown: () => popup.move(1), ArrowUp: () => popup.move(-1), Enter: () => popup.pick(),
    Tab: () => popup.pick(), Escape: () => popup.hide() };
  const action = keys[event.key];
  if (!action) return;
  event.preventDefault();
  event.stopPropagation();
  action();
}

/** Offers concept tokens in `textarea` after "<"; `candidates()` resolves to [{text, detail}]. */
export function attachAutocomplete(textarea, candidates) {
  if (textarea.dataset.mixofshowAutocomplete) return;
  textarea.dataset.mixofshowAutocomplete = "on";
  textarea.addEventListener("input", () => update(textarea, candidates));
  textarea.addEventListener("keydown", (event) => onKey(event, textarea), true);
  textarea.addEventListener("blur", () => {
    if (popup?.target === textarea) popup.hide();
  });
}
