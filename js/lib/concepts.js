// Which concept tokens a prompt can use: walk the graph links back to the loaders and ask each for
// its tokens (what it showed after its last run, else the file's tokens from the backend route
// GET /mixofshow/tokens, which also works before any run; a trainer's are its concept_tokens
// widget). No app import: `api` is passed in.
import { CONCEPTS, EDLORA_LOADER, LORA_CONCEPT, ROUTE_TOKENS, TRAIN_EDLORA } from "./names.js";

export const TOKENS_SHOWN = "mixofshowTokens"; // node property: the tokens its last run reported

const byFile = new Map(); // edlora_name -> Promise<string[]>

export function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

function isLoader(node) {
  return [EDLORA_LOADER, LORA_CONCEPT, TRAIN_EDLORA].includes(node.comfyClass);
}

/** Nodes upstream of `node` through inputs of the given socket types (and untyped reroutes), nearest first. */
function upstreamNodes(node, types) {
  const found = [];
  const seen = new Set([node.id]);
  const queue = [node];
  while (queue.length) {
    const current = queue.shift();
    (current.inputs ?? []).forEach((input, slot) => {
      if (input.link == null || !(types.includes(input.type) || input.type === "*")) return;
      const origin = current.getInputNode(slot);
      if (!origin || seen.has(origin.id)) return;
      seen.add(origin.id);
      found.push(origin);
      queue.push(origin);
    });
  }
  return found;
}

/** The concept tokens an ED-LoRA file defines (cached per file name; failures are retried). */
export function tokensOfFile(api, name) {
  if (!name) return Promise.resolve([]);
  if (!byFile.has(name)) {
    const request = api.fetchApi(`${ROUTE_TOKENS}?name=${encodeURIComponent(name)}`)
      .then(async (response) => {
        if (!response.ok) throw new Error((await response.json()).error ?? response.statusText);
        return (await response.json()).tokens;
      })
      .catch((error) => {
        byFile.delete(name);
        console.warn(`[mixofshow] no concept tokens for ${name}: ${error.message}`);
        return [];
      });
    byFile.set(name, request);
  }
  return byFile.get(name);
}

/** One loader's own tokens: after a run what it reported, else the file's. */
async function loaderTokens(api, loader) {
  if (loader.comfyClass === LORA_CONCEPT) {
    const words = String(widgetValue(loader, "trigger_words") ?? "").trim();
    return words ? [words] : [];
  }
  if (loader.comfyClass === TRAIN_EDLORA) {
    return String(widgetValue(loader, "concept_tokens") ?? "").split(/[+\s]+/).filter((t) => /^<[^<>\s]+>$/.test(t));
  }
  return loader[TOKENS_SHOWN] ?? tokensOfFile(api, widgetValue(loader, "edlora_name"));
}

/** Completion candidates {text, detail} of every loader upstream of `node` through `types` inputs. */
export async function conceptCandidates(api, node, types = [CONCEPTS]) {
  const loaders = upstreamNodes(node, types).filter(isLoader);
  const lists = await Promise.all(loaders.map(async (loader) => {
    const file = widgetValue(loader, loader.comfyClass === LORA_CONCEPT ? "lora_name" : "edlora_name") ?? "";
    const detail = loader.comfyClass === LORA_CONCEPT ? `${file} (trigger words)`
      : loader.comfyClass === TRAIN_EDLORA ? "being trained" : file;
    return (await loaderTokens(api, loader)).map((text) => ({ text, detail }));
  }));
  return lists.flat();
}
