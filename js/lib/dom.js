// Small DOM helpers shared by the pack's widgets (no app import).

/** `document.createElement(tag)` with properties (style as an object, dataset, on<event> handlers) and children. */
export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "style") Object.assign(node.style, value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of [].concat(children)) {
    if (child != null) node.append(child);
  }
  return node;
}

/** Adds a stylesheet once per id. */
export function addStyle(id, css) {
  if (document.getElementById(id)) return;
  document.head.append(el("style", { id, textContent: css }));
}

/** Stops pointer, wheel and keydown events at `element`, so that dragging, scrolling or typing in it does
 * not also move the canvas, drag the node or delete it (both renderers listen further up). Keyup
 * passes: the workflow's change tracker listens for it. */
export function keepEvents(element, types = ["pointerdown", "mousedown", "dblclick", "wheel", "keydown",
  "contextmenu"]) {
  for (const type of types) element.addEventListener(type, (e) => e.stopPropagation());
}
