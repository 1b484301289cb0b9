// Mix-of-Show for ComfyUI: after "Load ED-LoRA" runs, show the concept tokens the file defined,
// so users can copy them into their prompts.
import { app } from "../../scripts/app.js";

const LOADERS = new Set(["MixOfShowLoadEDLoRA"]);

app.registerExtension({
  name: "mixofshow.concepts",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!LOADERS.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "concept_tokens");
      if (!widget) {
        widget = this.addWidget("text", "concept_tokens", "", () => {}, { serialize: false });
        widget.disabled = true;
      }
      widget.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
  async setup() {
    window.__mixofshowExtension = true;
  },
});
