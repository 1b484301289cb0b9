// The Regions Editor's boxes: parsing, saving and geometry, without any DOM or app. Boxes are
// {top, left, bottom, right, prompt, negative, control_strength, label, color} in pixels of the
// output image, bottom/right exclusive (what nodes/editor_nodes.py parse_boxes reads).

// Same colours, same order as fusion/preview.py PALETTE (the backend's preview).
export const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990"];
const MIN_BOX_PX = 4;
const TOKEN = /<[^<>\s()[\]{}:,]+>/;

function colorFor(index) {
  return PALETTE[index % PALETTE.length];
}

function num(value, fallback) {
  const n = Number(value);
  return Number.isFinite(n) ? n : fallback;
}

function str(value) {
  return typeof value === "string" ? value : "";
}

/** A box with every field present (missing ones get the defaults the backend uses). */
export function completeBox(box, index) {
  return {
    top: Math.round(num(box.top, 0)),
    left: Math.round(num(box.left, 0)),
    bottom: Math.round(num(box.bottom, 0)),
    right: Math.round(num(box.right, 0)),
    prompt: str(box.prompt),
    negative: str(box.negative),
    control_strength: num(box.control_strength, 1),
    label: str(box.label),
    color: /^#[0-9a-fA-F]{6}$/.test(box.color ?? "") ? box.color : colorFor(index),
  };
}

/** Boxes from the saved widget value; anything unreadable gives no boxes (the backend names the error). */
export function parseBoxes(text) {
  let data;
  try {
    data = JSON.parse(text || "[]");
  } catch {
    return [];
  }
  if (!Array.isArray(data)) return [];
  return data.filter((b) => b && typeof b === "object").map(completeBox);
}

export function serializeBoxes(boxes) {
  return JSON.stringify(boxes.map((b, i) => completeBox(b, i)));
}

const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);

/** The box from two corner points (any order), rounded and kept inside the image. */
export function boxFromPoints(x0, y0, x1, y1, width, height) {
  return {
    top: Math.round(clamp(Math.min(y0, y1), 0, height)),
    left: Math.round(clamp(Math.min(x0, x1), 0, width)),
    bottom: Math.round(clamp(Math.max(y0, y1), 0, height)),
    right: Math.round(clamp(Math.max(x0, x1), 0, width)),
  };
}

export function isUsable(box) {
  return box.bottom - box.top >= MIN_BOX_PX && box.right - box.left >= MIN_BOX_PX;
}

/** The box moved by (dx, dy), its size kept, stopped at the image border. */
export function moveBox(box, dx, dy, width, height) {
  const h = box.bottom - box.top;
  const w = box.right - box.left;
  const top = Math.round(clamp(box.top + dy, 0, Math.max(0, height - h)));
  const left = Math.round(clamp(box.left + dx, 0, Math.max(0, width - w)));
  return { ...box, top, left, bottom: top + h, right: left + w };
}

/** The box with the corner or edge `handle` ("n", "s", "e", "w", "nw", ...) dragged to (x, y). */
export function resizeBox(box, handle, x, y, width, height) {
  const out = { ...box };
  const cx = Math.round(clamp(x, 0, width));
  const cy = Math.round(clamp(y, 0, height));
  if (handle.includes("n")) out.top = Math.min(cy, box.bottom - MIN_BOX_PX);
  if (handle.includes("s")) out.bottom = Math.max(cy, box.top + MIN_BOX_PX);
  if (handle.includes("w")) out.left = Math.min(cx, box.right - MIN_BOX_PX);
  if (handle.includes("e")) out.right = Math.max(cx, box.left + MIN_BOX_PX);
  return out;
}

/** Boxes for the detector's [top, left, bottom, right] list: box i keeps what box i had (prompts,
 * label, colour, strength), so re-detecting after editing the prompts loses no text. */
export function boxesFromPose(detected, existing) {
  return detected.map(([top, left, bottom, right], i) => completeBox({ ...(existing[i] ?? {}), top, left, bottom,
    right }, i));
}

/** What the backend's preview writes on a box (nodes/regions.py prompt_label). */
export function labelOf(box, index) {
  if (box.label.trim()) return box.label.trim();
  const token = box.prompt.match(TOKEN);
  if (token) return token[0];
  const words = box.prompt.replace(/[(),:[\]]/g, " ").split(/\s+/).filter(Boolean);
  return words.slice(0, 3).join(" ") || `region ${index + 1}`;
}
