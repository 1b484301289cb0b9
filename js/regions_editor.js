// The Regions Editor (Mix-of-Show): a DOM widget (so it works on the classic canvas and in Nodes 2.0)
// that replaces the node's regions_json text widget. Boxes are drawn over the connected image (the
// shipped pose, a Load Image file, or after a run whatever fed the node), or a grey canvas of
// width × height. The widget's value is the JSON the backend reads (nodes/editor_nodes.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { attachAutocomplete } from "./lib/autocomplete.js";
import { conceptCandidates, widgetValue } from "./lib/concepts.js";
import { addStyle, el, keepEvents } from "./lib/dom.js";
import { inputOrigin, knownImage, viewUrl } from "./lib/image_source.js";
import { REGIONS_EDITOR, ROUTE_POSE_BOXES, UI_CANVAS } from "./lib/names.js";
import { boxesFromPose, boxFromPoints, completeBox, isUsable, labelOf, moveBox, parseBoxes, resizeBox,
  serializeBoxes } from "./lib/regions.js";

const HANDLES = ["nw", "ne", "sw", "se"];
const SOURCE_POLL_MS = 1000; // the upstream Load Image / pose choice has no event we can listen to

addStyle("mixofshow-editor-style", `
.mixofshow-editor { box-sizing: border-box; display: flex; flex-direction: column; gap: 6px; width: 100%;
  height: 100%; min-height: 0; color: #ddd; font: 12px sans-serif; }
.mixofshow-editor .mixofshow-toolbar { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.mixofshow-editor .mixofshow-toolbar button, .mixofshow-editor .mixofshow-row button { background: #333; color: #eee;
  border: 1px solid #555; border-radius: 4px; padding: 2px 8px; cursor: pointer; font: 12px sans-serif; }
.mixofshow-editor .mixofshow-toolbar button:hover,
.mixofshow-editor .mixofshow-row button:hover { background: #444; }
.mixofshow-editor .mixofshow-info { color: #999; flex: 1; min-width: 120px; }
.mixofshow-editor .mixofshow-stage { position: relative; width: 100%; flex: none; background: #404040;
  overflow: hidden; cursor: crosshair; border-radius: 4px; touch-action: none; user-select: none; outline: none; }
.mixofshow-editor .mixofshow-stage img { position: absolute; inset: 0; width: 100%; height: 100%;
  pointer-events: none; }
.mixofshow-editor .mixofshow-box, .mixofshow-editor .mixofshow-draft { position: absolute; box-sizing: border-box;
  border: 2px solid; cursor: move; }
.mixofshow-editor .mixofshow-draft { border-style: dashed; border-color: #fff; pointer-events: none; }
.mixofshow-editor .mixofshow-box.mixofshow-selected { border-width: 3px; box-shadow: 0 0 0 1px #fff; }
.mixofshow-editor .mixofshow-box-label { position: absolute; left: 0; top: 0; padding: 1px 4px; font: 11px monospace;
  color: #fff; white-space: nowrap; max-width: 100%; overflow: hidden; text-overflow: ellipsis; pointer-events: none;
  text-shadow: 0 0 2px #000; }
.mixofshow-editor .mixofshow-handle { position: absolute; width: 10px; height: 10px; background: #fff;
  border: 1px solid #000; box-sizing: border-box; }
.mixofshow-editor .mixofshow-handle.mixofshow-nw { left: -5px; top: -5px; cursor: nwse-resize; }
.mixofshow-editor .mixofshow-handle.mixofshow-se { right: -5px; bottom: -5px; cursor: nwse-resize; }
.mixofshow-editor .mixofshow-handle.mixofshow-ne { right: -5px; top: -5px; cursor: nesw-resize; }
.mixofshow-editor .mixofshow-handle.mixofshow-sw { left: -5px; bottom: -5px; cursor: nesw-resize; }
.mixofshow-editor .mixofshow-box-delete { position: absolute; right: 2px; top: 2px; width: 16px; height: 16px;
  line-height: 14px; padding: 0; text-align: center; background: rgba(0,0,0,.6); color: #fff; border: none;
  border-radius: 3px; cursor: pointer; }
.mixofshow-editor .mixofshow-list { flex: 1; min-height: 60px; overflow-y: auto; display: flex;
  flex-direction: column; gap: 6px; }
.mixofshow-editor .mixofshow-row { border-left: 4px solid; padding: 4px 6px; background: #262626; border-radius: 4px;
  display: flex; flex-direction: column; gap: 3px; }
.mixofshow-editor .mixofshow-row.mixofshow-selected { background: #2f3540; }
.mixofshow-editor .mixofshow-row-head { display: flex; gap: 6px; align-items: center; }
.mixofshow-editor .mixofshow-row-head input[type=color] { width: 24px; height: 20px; padding: 0; border: none;
  background: none; }
.mixofshow-editor .mixofshow-row-head .mixofshow-label { flex: 1; min-width: 40px; }
.mixofshow-editor .mixofshow-row input, .mixofshow-editor .mixofshow-row textarea { background: #1b1b1b; color: #ddd;
  border: 1px solid #444; border-radius: 3px; font: 12px monospace; box-sizing: border-box; }
.mixofshow-editor .mixofshow-row textarea { width: 100%; resize: vertical; min-height: 34px; }
.mixofshow-editor .mixofshow-row input[type=number] { width: 56px; }
.mixofshow-editor .mixofshow-status { color: #9c9; min-height: 14px; }
.mixofshow-editor .mixofshow-status.mixofshow-error { color: #f88; }
.mixofshow-editor .mixofshow-empty { color: #888; font-style: italic; padding: 4px; }
`);

class RegionsEditor {
  constructor(node) {
    this.node = node;
    this.boxes = [];
    this.selected = -1;
    this.drag = null;
    this.lastRun = null; // {width, height, background} from the node's last execution
    this.source = null; // the picture shown: {key, url, ref, from}
    this.natural = null; // its size once loaded
    this.build();
  }

  // ---- value (the regions_json widget's)
  get value() {
    return serializeBoxes(this.boxes);
  }

  set value(text) {
    // Nodes 2.0 writes the value back after every commit: an unchanged value must not re-render (it
    // would drop the selection and the focus of the prompt being typed in)
    if (text === this.value) return;
    this.boxes = parseBoxes(text);
    this.selected = -1;
    this.renderAll();
  }

  commit() {
    this.widget?.callback?.(this.value);
    this.node.setDirtyCanvas?.(true, true);
  }

  // ---- size and picture
  /** The output image's size: the connected image's (once known), else width × height. */
  size() {
    if (inputOrigin(this.node, "image")) {
      if (this.natural) return this.natural;
      if (this.lastRun) return { width: this.lastRun.width, height: this.lastRun.height };
    }
    const width = Number(widgetValue(this.node, "width")) || 512;
    return { width, height: Number(widgetValue(this.node, "height")) || 512 };
  }

  /** The picture to show: the upstream pose or file, else the last run's input image, else none. */
  currentSource() {
    if (!inputOrigin(this.node, "image")) return null;
    const known = knownImage(api, this.node, "image");
    if (known) return known;
    const background = this.lastRun?.background;
    return background ? { key: `run:${background.filename}`, url: viewUrl(api, background), ref: background,
      from: "the last run" } : null;
  }

  refreshSource() {
    const source = this.currentSource();
    if ((source?.key ?? null) === (this.source?.key ?? null)) return;
    this.source = source;
    this.natural = null;
    if (source) {
      this.image.src = source.url;
    } else {
      this.image.removeAttribute("src");
    }
    this.image.style.display = source ? "block" : "none";
    this.renderAll();
  }

  // ---- DOM
  build() {
    this.image = el("img", { draggable: false, style: { display: "none" }, onload: () => {
      this.natural = { width: this.image.naturalWidth, height: this.image.naturalHeight };
      this.renderAll();
    }, onerror: () => this.status(`could not load the picture from ${this.source?.from ?? "the input"}`, true) });
    this.boxLayer = el("div", { style: { position: "absolute", inset: "0" } });
    this.draft = el("div", { className: "mixofshow-draft", style: { display: "none" } });
    this.stage = el("div", { className: "mixofshow-stage", tabIndex: 0 }, [this.image, this.boxLayer, this.draft]);
    this.info = el("span", { className: "mixofshow-info" });
    this.list = el("div", { className: "mixofshow-list" });
    this.statusLine = el("div", { className: "mixofshow-status" });
    const toolbar = el("div", { className: "mixofshow-toolbar" }, [
      el("button", { textContent: "From pose", title: "One box per skeleton found in the image (the detector of "
        + "Regions from Pose); box i keeps its prompts", onclick: () => this.fromPose() }),
      el("button", { textContent: "Clear", title: "Remove every box", onclick: () => this.clear() }),
      this.info,
    ]);
    this.element = el("div", { className: "mixofshow-editor" }, [toolbar, this.stage, this.list, this.statusLine]);
    keepEvents(this.element);
    keepEvents(this.stage, ["pointerup", "click"]);
    this.stage.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.stage.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.stage.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.stage.addEventListener("pointercancel", () => this.cancelDrag());
    this.stage.addEventListener("keydown", (e) => {
      if ((e.key === "Delete" || e.key === "Backspace") && this.selected >= 0) {
        e.preventDefault();
        this.remove(this.selected);
      }
    });
  }

  status(text, isError = false) {
    this.statusLine.textContent = text;
    this.statusLine.classList.toggle("mixofshow-error", isError);
  }

  renderAll() {
    this.renderStage();
    this.renderList();
  }

  renderStage() {
    const { width, height } = this.size();
    this.stage.style.aspectRatio = `${width} / ${height}`;
    const where = this.source ? `image from ${this.source.from}` : inputOrigin(this.node, "image")
      ? "image known after a run" : "blank canvas";
    this.info.textContent = `${width}×${height} · ${where} · drag to draw a box`;
    this.boxLayer.replaceChildren(...this.boxes.map((box, i) => this.boxElement(box, i)));
  }

  boxElement(box, index) {
    const { width, height } = this.size();
    const selected = index === this.selected ? " mixofshow-selected" : "";
    const frame = el("div", { className: `mixofshow-box${selected}`, dataset: { index },
      style: { left: `${(100 * box.left) / width}%`, top: `${(100 * box.top) / height}%`,
        width: `${(100 * (box.right - box.left)) / width}%`, height: `${(100 * (box.bottom - box.top)) / height}%`,
        borderColor: box.color, background: `${box.color}33` } }, [
      el("div", { className: "mixofshow-box-label", textContent: `${index + 1}: ${labelOf(box, index)}`,
        style: { background: `${box.color}cc` } }),
      el("button", { className: "mixofshow-box-delete", textContent: "×", title: "Delete this box",
        dataset: { action: "delete" } }),
      ...HANDLES.map((handle) => el("div", { className: `mixofshow-handle mixofshow-${handle}`,
        dataset: { handle } })),
    ]);
    return frame;
  }

  renderList() {
    if (!this.boxes.length) {
      this.list.replaceChildren(el("div", { className: "mixofshow-empty", textContent:
        "No boxes yet: drag on the picture to draw one, or click From pose." }));
      return;
    }
    this.list.replaceChildren(...this.boxes.map((box, i) => this.rowElement(box, i)));
  }

  rowElement(box, index) {
    const update = (field, value) => {
      this.boxes[index] = { ...this.boxes[index], [field]: value };
      this.renderStage();
      this.commit();
    };
    const prompt = el("textarea", { className: "mixofshow-prompt", value: box.prompt, rows: 2,
      placeholder: "prompt of this box, e.g. a <potter1> <potter2>, in a robe (type < for tokens)",
      oninput: (e) => update("prompt", e.target.value) });
    const negative = el("textarea", { className: "mixofshow-negative", value: box.negative, rows: 1,
      placeholder: "negative prompt of this box", oninput: (e) => update("negative", e.target.value) });
    for (const field of [prompt, negative]) attachAutocomplete(field, () => conceptCandidates(api, this.node));
    const selected = index === this.selected ? " mixofshow-selected" : "";
    return el("div", { className: `mixofshow-row${selected}`, dataset: { index },
      style: { borderLeftColor: box.color }, onfocusin: () => this.select(index, false) }, [
      el("div", { className: "mixofshow-row-head" }, [
        el("input", { type: "color", value: box.color, title: "Colour of this box",
          oninput: (e) => update("color", e.target.value), onchange: () => this.renderList() }),
        el("b", { textContent: String(index + 1) }),
        el("input", { className: "mixofshow-label", value: box.label, placeholder: "label (default: first token)",
          oninput: (e) => update("label", e.target.value) }),
        el("span", { textContent: "control" }),
        el("input", { type: "number", min: 0, max: 10, step: 0.05, value: box.control_strength,
          title: "Factor on ControlNet/T2I-Adapter residuals inside this box (1 = unchanged)",
          onchange: (e) => update("control_strength", Math.min(10, Math.max(0, Number(e.target.value) || 0))) }),
        el("button", { textContent: "×", title: "Delete this box", onclick: () => this.remove(index) }),
      ]),
      prompt,
      negative,
    ]);
  }

  select(index, scroll = true) {
    if (index === this.selected) return;
    this.selected = index;
    this.renderStage();
    [...this.list.children].forEach((row, i) => row.classList?.toggle("mixofshow-selected", i === index));
    if (scroll) this.list.children[index]?.scrollIntoView({ block: "nearest" });
  }

  // ---- editing
  remove(index) {
    this.boxes = this.boxes.filter((_, i) => i !== index).map((box, i) => completeBox(box, i));
    this.selected = -1;
    this.renderAll();
    this.commit();
  }

  clear() {
    this.boxes = [];
    this.selected = -1;
    this.renderAll();
    this.commit();
  }

  /** The pointer's position in pixels of the output image (the stage may be CSS-scaled by the renderer). */
  toImage(event) {
    const rect = this.stage.getBoundingClientRect();
    const { width, height } = this.size();
    return { x: ((event.clientX - rect.left) / rect.width) * width,
      y: ((event.clientY - rect.top) / rect.height) * height };
  }

  onPointerDown(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    this.stage.focus({ preventScroll: true });
    const frame = event.target.closest(".mixofshow-box");
    const index = frame ? Number(frame.dataset.index) : -1;
    if (event.target.dataset.action === "delete") {
      this.remove(index);
      return;
    }
    const point = this.toImage(event);
    if (index >= 0) {
      this.select(index);
      const handle = event.target.dataset.handle;
      this.drag = handle ? { mode: "resize", index, handle }
        : { mode: "move", index, start: point, box: this.boxes[index] };
    } else {
      this.select(-1);
      this.drag = { mode: "draw", start: point };
    }
    this.stage.setPointerCapture(event.pointerId);
  }

  onPointerMove(event) {
    if (!this.drag) return;
    const { width, height } = this.size();
    const point = this.toImage(event);
    const { mode, index, start } = this.drag;
    if (mode === "draw") {
      const box = boxFromPoints(start.x, start.y, point.x, point.y, width, height);
      this.drag.box = box;
      Object.assign(this.draft.style, { display: "block", left: `${(100 * box.left) / width}%`,
        top: `${(100 * box.top) / height}%`, width: `${(100 * (box.right - box.left)) / width}%`,
        height: `${(100 * (box.bottom - box.top)) / height}%` });
      return;
    }
    this.boxes[index] = mode === "move"
      ? moveBox(this.drag.box, point.x - start.x, point.y - start.y, width, height)
      : resizeBox(this.boxes[index], this.drag.handle, point.x, point.y, width, height);
    this.drag.changed = true;
    this.renderStage();
  }

  onPointerUp(event) {
    const drag = this.drag;
    if (!drag) return;
    this.onPointerMove(event);
    this.cancelDrag();
    if (drag.mode === "draw") {
      if (!drag.box || !isUsable(drag.box)) return;
      this.boxes.push(completeBox({ ...drag.box, prompt: "" }, this.boxes.length));
      this.selected = this.boxes.length - 1;
      this.renderAll();
      this.commit();
      // after the renderer has handled the pointer release (Nodes 2.0 moves the focus on it)
      const prompt = this.list.children[this.selected]?.querySelector(".mixofshow-prompt");
      setTimeout(() => prompt?.focus());
    } else if (drag.changed) {
      this.renderList();
      this.commit();
    }
  }

  cancelDrag() {
    this.drag = null;
    this.draft.style.display = "none";
  }

  async fromPose() {
    const source = this.currentSource();
    if (!source) {
      this.status("Connect the pose to 'image' (Load Reference Pose or Load Image), or run the workflow once.", true);
      return;
    }
    this.status("Looking for people in the pose…");
    try {
      const response = await api.fetchApi(ROUTE_POSE_BOXES, { method: "POST",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image: source.ref }) });
      const found = await response.json();
      if (!response.ok) throw new Error(found.error ?? response.statusText);
      if (!found.boxes.length) throw new Error("no skeleton found in the image");
      this.natural = { width: found.width, height: found.height };
      this.boxes = boxesFromPose(found.boxes, this.boxes);
      this.selected = -1;
      this.renderAll();
      this.commit();
      this.status(`${found.boxes.length} ${found.boxes.length === 1 ? "person" : "people"} found, left to right.`);
    } catch (error) {
      this.status(`From pose: ${error.message}`, true);
    }
  }
}

/** Puts the editor where the regions_json text widget was: widgets_values are saved by position. */
function setUpEditor(node) {
  const index = node.widgets?.findIndex((w) => w.name === "regions_json") ?? -1;
  if (index < 0) return;
  const editor = new RegionsEditor(node);
  editor.boxes = parseBoxes(node.widgets[index].value);
  node.widgets.splice(index, 1);
  const widget = node.addDOMWidget("regions_json", "mixofshow_regions", editor.element, {
    getValue: () => editor.value,
    setValue: (value) => {
      editor.value = value;
    },
    getMinHeight: () => 440,
    hideOnZoom: false,
  });
  node.widgets.splice(node.widgets.indexOf(widget), 1);
  node.widgets.splice(index, 0, widget);
  editor.widget = widget;
  for (const name of ["width", "height"]) {
    const sizeWidget = node.widgets.find((w) => w.name === name);
    const callback = sizeWidget?.callback;
    if (sizeWidget) {
      sizeWidget.callback = function () {
        const result = callback?.apply(this, arguments);
        editor.renderAll();
        return result;
      };
    }
  }
  node.mixofshowEditor = editor;
  node.setSize([Math.max(node.size[0], 460), Math.max(node.size[1], 720)]);
  editor.renderAll();
}

app.registerExtension({
  name: "mixofshow.regionsEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== REGIONS_EDITOR) return;
    const chain = (name, after) => {
      const original = nodeType.prototype[name];
      nodeType.prototype[name] = function () {
        const result = original?.apply(this, arguments);
        after.apply(this, arguments);
        return result;
      };
    };
    chain("onNodeCreated", function () {
      setUpEditor(this);
    });
    chain("onAdded", function () {
      const editor = this.mixofshowEditor;
      if (editor && !editor.poll) editor.poll = setInterval(() => editor.refreshSource(), SOURCE_POLL_MS);
    });
    chain("onRemoved", function () {
      clearInterval(this.mixofshowEditor?.poll);
      if (this.mixofshowEditor) this.mixofshowEditor.poll = null;
    });
    chain("onConnectionsChange", function () {
      this.mixofshowEditor?.refreshSource();
      this.mixofshowEditor?.renderAll();
    });
    chain("onExecuted", function (message) {
      const editor = this.mixofshowEditor;
      if (!editor) return;
      editor.lastRun = message?.[UI_CANVAS]?.[0] ?? null;
      editor.refreshSource();
      editor.renderAll();
    });
  },
});
