// Typing "<" in the pack's prompt widgets (Text Encode with Concepts, Regions from Pose) offers the
// tokens of the concept set connected upstream. The Regions Editor attaches the same popup to its
// own prompt fields. Works on the textarea of either renderer: found through focus, not the widget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { attachAutocomplete } from "./lib/autocomplete.js";
import { conceptCandidates } from "./lib/concepts.js";
import { POSE_REGIONS, TEXT_ENCODE } from "./lib/names.js";

const PROMPT_NODES = new Set([TEXT_ENCODE, POSE_REGIONS]);

/** The graph node whose widget `textarea` is (Nodes 2.0 marks node elements with data-node-id). */
function nodeOf(textarea) {
  const graph = app.canvas?.graph ?? app.graph;
  const vueNode = textarea.closest("[data-node-id]");
  if (vueNode) return graph.getNodeById(vueNode.dataset.nodeId);
  return (graph.nodes ?? graph._nodes ?? []).find((node) =>
    (node.widgets ?? []).some((w) => ("element" in w ? w.element : w.inputEl) === textarea));
}

app.registerExtension({
  name: "mixofshow.autocomplete",
  async setup() {
    document.addEventListener("focusin", (event) => {
      const textarea = event.target;
      if (!(textarea instanceof HTMLTextAreaElement) || textarea.dataset.mixofshowAutocomplete) return;
      const node = nodeOf(textarea);
      if (node && PROMPT_NODES.has(node.comfyClass)) attachAutocomplete(textarea, () => conceptCandidates(api, node));
    });
  },
});
