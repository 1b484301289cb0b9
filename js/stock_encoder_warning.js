// When a prompt is queued, a stock text encoder (CLIP Text Encode or any other node that is not the
// pack's and takes a CLIP) whose text holds a concept token defined by the loader chain of its CLIP
// gets a warning toast: the stock encoder would encode "<potter1>" as plain text, not as the concept.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { conceptCandidates } from "./lib/concepts.js";
import { CLIP, CONCEPTS, NODE_ID_PREFIX } from "./lib/names.js";
import { tokensIn } from "./lib/tokens.js";

const MUTED = 2; // LiteGraph node modes that do not run
const BYPASSED = 4;

/** [{node, tokens}] for every stock CLIP node whose text uses tokens its CLIP's chain defines. */
async function stockEncodersWithConceptTokens(graph) {
  const found = [];
  for (const node of graph.nodes ?? graph._nodes ?? []) {
    const packNode = String(node.comfyClass ?? "").startsWith(NODE_ID_PREFIX);
    if (packNode || node.mode === MUTED || node.mode === BYPASSED) continue;
    if (!(node.inputs ?? []).some((input) => input.type === CLIP && input.link != null)) continue;
    const written = (node.widgets ?? []).flatMap((w) => (typeof w.value === "string" ? tokensIn(w.value) : []));
    if (!written.length) continue;
    const defined = new Set((await conceptCandidates(api, node, [CLIP, CONCEPTS])).map((c) => c.text));
    const tokens = [...new Set(written.filter((token) => defined.has(token)))];
    if (tokens.length) found.push({ node, tokens });
  }
  return found;
}

async function warn() {
  for (const { node, tokens } of await stockEncodersWithConceptTokens(app.graph)) {
    const detail = `"${node.title}" (#${node.id}) is a stock text encoder: it encodes ${tokens.join(" ")} as plain ` +
      "text, not as the ED-LoRA concept. Use Text Encode with Concepts (Mix-of-Show) for prompts with concept tokens.";
    console.warn(`[mixofshow] ${detail}`);
    app.extensionManager?.toast?.add({ severity: "warn", summary: "Concept token in a stock text encoder", detail,
      life: 20000 });
  }
}

app.registerExtension({
  name: "mixofshow.stockEncoderWarning",
  async setup() {
    api.addEventListener("promptQueued", warn);
  },
});
