// Gradient Fusion: a new node's seed is "fixed" (a changed seed re-runs the whole fusion; the cache
// only helps when it stays). Loaded workflows keep their saved value: it is applied after creation.
// Stage text sent by the node (send_progress_text) is shown by the frontend itself.
import { app } from "../../scripts/app.js";
import { GRADIENT_FUSION } from "./lib/names.js";

app.registerExtension({
  name: "mixofshow.fusion",
  nodeCreated(node) {
    if (node.comfyClass !== GRADIENT_FUSION) return;
    const control = node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
