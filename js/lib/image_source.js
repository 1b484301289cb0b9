// Where the picture under a node's IMAGE input can be seen and read before a run: a shipped pose
// (Load Reference Pose) or a file in input/ (Load Image). No app import: `api` is passed in.
import { widgetValue } from "./concepts.js";
import { LOAD_IMAGE, REFERENCE_POSE, ROUTE_POSES } from "./names.js";

/** {filename, subfolder, type} of a Load Image value such as "poses/a.png [output]". */
function parseAnnotatedName(value) {
  let name = String(value ?? "");
  let type = "input";
  const annotated = /^(.*?)\s*\[(input|output|temp)\]$/.exec(name);
  if (annotated) [, name, type] = annotated;
  const slash = name.lastIndexOf("/");
  return { filename: name.slice(slash + 1), subfolder: slash >= 0 ? name.slice(0, slash) : "", type };
}

export function viewUrl(api, ref) {
  const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type });
  return api.apiURL(`/view?${query}`);
}

export function poseUrl(api, name) {
  return api.apiURL(ROUTE_POSES.replace("{name}", encodeURIComponent(name)));
}

/** The node feeding input `inputName` of `node`, or null. */
export function inputOrigin(node, inputName) {
  const slot = node.inputs?.findIndex((input) => input.name === inputName) ?? -1;
  return slot >= 0 && node.inputs[slot].link != null ? node.getInputNode(slot) : null;
}

/** {key, url, ref, from} of the picture at `node`'s input `inputName` when it is known before a run
 * (ref is what POST /mixofshow/pose_boxes takes), else null. */
export function knownImage(api, node, inputName) {
  const origin = inputOrigin(node, inputName);
  if (!origin) return null;
  if (origin.comfyClass === REFERENCE_POSE) {
    const pose = widgetValue(origin, "pose");
    return pose ? { key: `pose:${pose}`, url: poseUrl(api, pose), ref: { pose }, from: origin.title } : null;
  }
  if (origin.comfyClass === LOAD_IMAGE) {
    const value = widgetValue(origin, "image");
    if (!value) return null;
    const ref = parseAnnotatedName(value);
    return { key: `file:${value}`, url: viewUrl(api, ref), ref, from: origin.title };
  }
  return null;
}
