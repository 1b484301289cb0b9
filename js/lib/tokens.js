// Concept-token completion as text operations, without any DOM or app.
// A concept token is written like fusion/edlora.py TOKEN_PATTERN: <name> with no spaces or brackets.

const TOKEN_CHAR = /[^<>\s()[\]{}:,]/;
const TOKENS = /<[^<>\s()[\]{}:,]+>/g;

/** The token being typed at `caret`: {start, prefix} where prefix runs from its "<", else null. */
export function completionQuery(text, caret) {
  let i = caret;
  while (i > 0 && TOKEN_CHAR.test(text[i - 1])) i -= 1;
  if (i === 0 || text[i - 1] !== "<") return null;
  return { start: i - 1, prefix: text.slice(i - 1, caret) };
}

/** Candidates ({text, detail}) that fit the typed prefix, in order, without repeats. Concept tokens
 * match on their start; trigger words (no "<") match on the words typed after "<". */
export function matchCandidates(candidates, prefix) {
  const typed = prefix.toLowerCase();
  const seen = new Set();
  return candidates.filter((c) => {
    if (seen.has(c.text)) return false;
    const text = c.text.toLowerCase();
    const fits = text.startsWith("<") ? text.startsWith(typed) : text.startsWith(typed.slice(1));
    if (fits) seen.add(c.text);
    return fits;
  });
}

/** `text` with the typed token (from `start` to `caret`) replaced by `completion` and a space. */
export function applyCompletion(text, start, caret, completion) {
  let end = caret;
  while (end < text.length && TOKEN_CHAR.test(text[end])) end += 1;
  if (text[end] === ">") end += 1;
  const after = text.slice(end);
  const insert = completion + (after.startsWith(" ") || after.startsWith(",") ? "" : " ");
  return { text: text.slice(0, start) + insert + after, caret: start + insert.length };
}

/** The angle-bracket tokens written in `text`, in order. */
export function tokensIn(text) {
  return String(text ?? "").match(TOKENS) ?? [];
}
