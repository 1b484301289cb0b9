// Every name the browser shares with the server, in one place: node ids, socket types, HTTP routes and
// UI message keys. The server's home of the same names is nodes/names.py (node ids: on the node
// classes); a name that is also there has the same identifier here. Node ids never change once
// released: saved workflows hold them. tests/browser/test_ui.py checks this module against the server.
// Export-only: no imports, no side effects.

// ---- node ids: the pack's (every one starts with NODE_ID_PREFIX) ...
export const NODE_ID_PREFIX = "MixOfShow";
export const EDLORA_LOADER = "MixOfShowLoadEDLoRA";
export const LORA_CONCEPT = "MixOfShowLoRAConcept";
export const TEXT_ENCODE = "MixOfShowTextEncode";
export const POSE_REGIONS = "MixOfShowPoseRegions";
export const REGIONS_EDITOR = "MixOfShowRegionsEditor";
export const GRADIENT_FUSION = "MixOfShowGradientFusion";
export const REFERENCE_POSE = "MixOfShowLoadReferencePose";
export const TRAIN_EDLORA = "MixOfShowTrainEDLoRA";
// ... and ComfyUI's
export const LOAD_IMAGE = "LoadImage";

// ---- socket types: the pack's (names.CONCEPTS, names.REGIONS, names.TRAINSET) and ComfyUI's (names.LOSS_MAP is
// core's, kept there too)
export const CONCEPTS = "EDLORA_CONCEPTS";
export const REGIONS = "MIXOFSHOW_REGIONS";
export const TRAINSET = "EDLORA_TRAINSET";
export const LOSS_MAP = "LOSS_MAP";
export const CLIP = "CLIP";

// ---- HTTP routes (under the api prefix: pass them to api.fetchApi / api.apiURL)
export const ROUTE_TOKENS = "/mixofshow/tokens";
export const ROUTE_POSE_BOXES = "/mixofshow/pose_boxes";
export const ROUTE_POSES = "/mixofshow/poses/{name}";

// ---- keys of the UI messages nodes send after a run
export const UI_CANVAS = "mixofshow_canvas"; // the Regions Editor's {width, height, background}
