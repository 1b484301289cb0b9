"""Run a ComfyUI workflow headless against a running ComfyUI server and save the images it makes.

    cd ComfyUI/custom_nodes/comfyui-mixofshow
    python -m mixofshow_run WORKFLOW.json [--set NODE.input=value ...] [--server URL] [--out DIR]

WORKFLOW.json is a workflow as the web UI saves it (``nodes``, ``links``, ``widgets_values``;
converted here through the server's ``/object_info`` the way the frontend's graphToPrompt does) or
an API-format prompt (``{id: {"class_type", "inputs"}}``). ``--set 3.seed=5`` or
``--set "Regional KSampler (Mix-of-Show).steps=30"`` changes an input before the prompt is queued
(NODE is a node id or title; the value is read as JSON when it parses, else as a string).

Only the standard library is needed, so any Python >= 3.10 runs it (no torch, no ComfyUI import).
With aiohttp importable (ComfyUI's own environment has it) progress comes from the server's
websocket; without it the runner waits on ``/history``.

Exit codes: 0 done; 1 the prompt failed while it ran; 2 bad arguments or a prompt the server
refused; 3 the server cannot be reached.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from types import ModuleType


def _optional_aiohttp() -> ModuleType | None:
    """aiohttp when importable (ComfyUI's environment has it); else progress comes from polling /history."""
    try:
        import aiohttp as module
    except ImportError:
        return None
    return module


aiohttp = _optional_aiohttp()

DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_OUT = Path("mixofshow_out")
MAX_DETAIL = 300  # characters of one error detail: a refused file name comes with the server's whole list
POLL_SECONDS = 0.5
# Widget input types of the frontend (its ComfyWidgets table); other types are sockets.
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "COLOR", "IMAGECOMPARE", "CHART",
                "GALLERIA", "TEXTAREA"}
SEED_INPUTS = ("seed", "noise_seed")  # INT inputs the frontend gives a control widget unless told otherwise
MEDIA_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
MODE_MUTED, MODE_BYPASSED = 2, 4  # LiteGraph's NEVER and BYPASS
Log = Callable[[str], None]


class RunError(Exception):
    """A failure with the message the user sees and the exit code it maps to."""
    exit_code = 1


class Refused(RunError):
    """Bad arguments, a workflow that cannot be converted, or a prompt the server refused."""
    exit_code = 2


class ExecutionFailed(RunError):
    exit_code = 1


class Unreachable(RunError):
    exit_code = 3


def _shorten(text: object, limit: int = MAX_DETAIL) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _print(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------- server


class Server:
    """The HTTP API of one ComfyUI server."""

    def __init__(self, url: str):
        self.url = (url if "://" in url else "http://" + url).rstrip("/")

    def _open(self, request: urllib.request.Request | str, timeout: float = 120):
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise Unreachable(f"cannot reach ComfyUI at {self.url} ({reason}); is it running? (--server URL)") from e

    def get_bytes(self, path: str) -> bytes:
        try:
            with self._open(self.url + path) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            raise RunError(f"GET {path}: HTTP {e.code} from {self.url}") from e

    def get_json(self, path: str):
        try:
            return json.loads(self.get_bytes(path))
        except ValueError as e:
            raise Unreachable(f"{self.url}{path} did not answer JSON: is this a ComfyUI server?") from e

    def post_json(self, path: str, body: dict) -> tuple[int, dict]:
        return self._answer(urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                                   headers={"Content-Type": "application/json"}))

    def _answer(self, request: urllib.request.Request | str) -> tuple[int, dict]:
        """(HTTP status, the JSON answer) of a request, error statuses included."""
        try:
            with self._open(request) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw or b"{}")
            except ValueError:
                return e.code, {"error": {"message": _shorten(raw.decode(errors="replace"))}}


# --------------------------------------------------------------------------- UI format -> API format


def is_ui_workflow(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_prompt(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(node, dict) and "class_type" in node for node in data.values())


def _spec_type_and_options(spec) -> tuple[str, dict]:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return ("COMBO" if isinstance(kind, list) else str(kind)), options


def _ordered_inputs(node_def: dict) -> list[tuple[str, object, bool]]:
    """(name, spec, optional) in the order the frontend builds the node: ``input_order`` if the
    server sends it, then any input it does not name."""
    inputs = node_def.get("input") or {}
    required, optional = inputs.get("required") or {}, inputs.get("optional") or {}
    order = node_def.get("input_order") or {"required": list(required), "optional": list(optional)}
    ordered = [(n, required[n], False) for n in order.get("required", []) if n in required]
    ordered += [(n, optional[n], True) for n in order.get("optional", []) if n in optional]
    named = {n for n, _, _ in ordered}
    ordered += [(n, s, False) for n, s in required.items() if n not in named]
    ordered += [(n, s, True) for n, s in optional.items() if n not in named]
    return ordered


def _is_widget(spec, optional: bool) -> bool:
    kind, options = _spec_type_and_options(spec)
    if options.get("forceInput") or (optional and options.get("defaultInput")):
        return False
    return kind in WIDGET_TYPES or "default" in options


def _default_value(spec):
    kind, options = _spec_type_and_options(spec)
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(kind)


def widget_slots(node_def: dict) -> list[tuple[str, object | None]]:
    """The node's widgets in the frontend's order, as (input name, spec), with spec None for the
    widgets it adds that are not inputs: the "control after generate" combo after a seed-like INT
    (plus a filter text after a COMBO with control_after_generate) and the upload button of a
    media-upload COMBO. ``widgets_values`` holds one value per widget, in this order."""
    slots: list[tuple[str, object | None]] = []
    for name, spec, optional in _ordered_inputs(node_def):
        if not _is_widget(spec, optional):
            continue
        slots.append((name, spec))
        kind, options = _spec_type_and_options(spec)
        control = options.get("control_after_generate")
        if kind == "INT" and (name in SEED_INPUTS if control is None else control):
            slots.append((f"{name}.control_after_generate", None))
        elif kind == "COMBO" and control:
            slots += [(f"{name}.control_after_generate", None), (f"{name}.control_filter_list", None)]
    required = (node_def.get("input") or {}).get("required") or {}
    media = any(_spec_type_and_options(s)[0] == "COMBO" and any(_spec_type_and_options(s)[1].get(o)
                for o in MEDIA_UPLOAD_OPTIONS) for s in required.values())
    audio = "audio" in required and _spec_type_and_options(required["audio"])[1].get("audio_upload")
    if media or audio:
        slots.append(("upload", None))
    return slots


def _as_prompt_value(value):
    return {"__value__": value} if isinstance(value, list) else value  # lists would read as links


def _valid_connection(a, b) -> bool:
    """LiteGraph's isValidConnection: "*" / "" match anything, "A,B" lists match any member."""
    a = "" if a in (None, "*") else str(a)
    b = "" if b in (None, "*") else str(b)
    if not a or not b or a == b:
        return True
    return bool({t.strip() for t in a.lower().split(",")} & {t.strip() for t in b.lower().split(",")})


class _UiGraph:
    """A UI-format workflow with the frontend's link resolution through reroutes, primitives and bypassed nodes."""

    def __init__(self, workflow: dict):
        self.nodes = {str(node["id"]): node for node in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link.get("type")]
            self.links[link[0]] = (str(link[1]), int(link[2]))

    def resolve_input(self, node: dict, index: int, wanted_type, seen: set):
        """What feeds input ``index`` of ``node``: ``[source_id, slot]``, ``("value", v)`` from a
        primitive, or None (unlinked, or nothing of the type behind a bypass)."""
        slot = node["inputs"][index]
        if slot.get("link") is None:
            return None
        if slot["link"] not in self.links:
            raise Refused(f"node {node['id']} input '{slot.get('name')}': link {slot['link']} is not in the "
                          f"workflow's links (a damaged workflow file?)")
        origin_id, origin_slot = self.links[slot["link"]]
        return self.resolve_output(origin_id, origin_slot, wanted_type or slot.get("type"), seen)

    def resolve_output(self, node_id: str, slot: int, wanted_type, seen: set):
        if (node_id, slot) in seen:
            raise Refused(f"node {node_id}: its links go round in a circle (through reroutes or bypassed nodes)")
        seen.add((node_id, slot))
        node = self.nodes.get(node_id)
        if node is None:
            raise Refused(f"a link comes from node {node_id}, which is not in the workflow")
        if node.get("mode") == MODE_BYPASSED:
            index = self._bypass_input(node, slot, wanted_type)
            return None if index is None else self.resolve_input(node, index, None, seen)
        if node.get("type") == "Reroute":
            return self.resolve_input(node, 0, wanted_type, seen) if node.get("inputs") else None
        if node.get("type") == "PrimitiveNode":  # the frontend copies its value onto the target widget
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node.get("type") in ("Note", "MarkdownNote"):
            return None
        return [node_id, slot]

    @staticmethod
    def _bypass_input(node: dict, slot: int, wanted_type) -> int | None:
        """The input a bypassed node passes through to output ``slot`` (the frontend's rule): the
        same index if its type fits, else the first input of exactly the wanted type, else the
        first compatible one."""
        inputs, outputs = node.get("inputs") or [], node.get("outputs") or []
        if not inputs:
            return None
        if wanted_type in (None, "", "*"):
            return slot if slot < len(inputs) else 0
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if slot < len(inputs) and _valid_connection(inputs[slot].get("type"), out_type) \
                and _valid_connection(inputs[slot].get("type"), wanted_type):
            return slot
        for i, candidate in enumerate(inputs):
            if candidate.get("type") == wanted_type:
                return i
        for i, candidate in enumerate(inputs):
            kind = candidate.get("type")
            if _valid_connection(kind, out_type) and _valid_connection(kind, wanted_type):
                return i
        return None


def _refuse_subgraphs(workflow: dict) -> None:
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    group_nodes = set((workflow.get("extra") or {}).get("groupNodes") or {})
    for node in workflow["nodes"]:
        kind = str(node.get("type"))
        if kind in subgraphs or kind.startswith("workflow>") or kind.startswith("workflow/") \
                or kind.split(">")[-1] in group_nodes:
            raise Refused(f"node {node['id']} is a subgraph or group node ({kind!r}); the runner converts flat "
                          f"workflows only: unpack it in the web UI, or export the API format there")
    if subgraphs or group_nodes:
        raise Refused("the workflow defines subgraphs or group nodes; the runner converts flat workflows only: "
                      "unpack them in the web UI, or export the API format there")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend's graphToPrompt makes of a UI-format workflow: widget values by
    the node definitions' widget order, links resolved through reroutes, primitives and bypassed
    nodes; notes, reroutes, primitives, muted and bypassed nodes left out."""
    _refuse_subgraphs(workflow)
    graph = _UiGraph(workflow)
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node.get("type")
        if kind in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode") or node.get("mode") in (MODE_MUTED,
                                                                                               MODE_BYPASSED):
            continue
        node_def = object_info.get(kind)
        if node_def is None:
            raise Refused(f"node {node['id']} is a {kind!r}, a node type this ComfyUI does not have "
                          f"(is its custom node pack installed?)")
        values = node.get("widgets_values")
        inputs = {}
        for index, (name, spec) in enumerate(widget_slots(node_def)):
            if spec is None:
                continue
            if isinstance(values, dict):  # some packs save widgets by name
                value = values.get(name, _default_value(spec))
            else:
                value = values[index] if values is not None and index < len(values) else _default_value(spec)
            inputs[name] = _as_prompt_value(value)
        for index, slot in enumerate(node.get("inputs") or []):
            source = graph.resolve_input(node, index, None, set())
            if isinstance(source, tuple):
                inputs[slot["name"]] = _as_prompt_value(source[1])
            elif source is not None:
                inputs[slot["name"]] = source
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind,
                                   "_meta": {"title": node.get("title") or node_def.get("display_name") or kind}}
    for entry in prompt.values():  # as the frontend does: links from nodes left out (muted) are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """An API-format prompt (a copy) from a UI-format workflow or an API-format prompt."""
    if is_ui_workflow(workflow):
        return ui_to_api(workflow, object_info)
    if is_api_prompt(workflow):
        return json.loads(json.dumps(workflow))
    raise Refused("not a ComfyUI workflow: expected the web UI's saved format (\"nodes\", \"links\") or the API "
                  "format ({id: {\"class_type\": ..., \"inputs\": ...}})")


# --------------------------------------------------------------------------- --set


def _title(entry: dict) -> str:
    return (entry.get("_meta") or {}).get("title") or entry["class_type"]


def _find_node(prompt: dict, reference: str, override: str) -> str:
    if reference in prompt:
        return reference
    matches = [node_id for node_id, entry in prompt.items() if _title(entry).casefold() == reference.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise Refused(f"--set {override!r}: {len(matches)} nodes are titled {reference!r} (ids {', '.join(matches)}); "
                      f"use the node id")
    known = ", ".join(f"{node_id} {_title(entry)!r}" for node_id, entry in prompt.items())
    raise Refused(f"--set {override!r}: no node has the id or title {reference!r}; nodes: {_shorten(known, 600)}")


def parse_value(text: str):
    """JSON when it parses (5, 0.5, true, "x", [..]), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(prompt: dict, overrides: list[str], object_info: dict) -> None:
    """Apply ``NODE.input=value`` settings to an API prompt (in place)."""
    for override in overrides:
        target, has_value, raw = override.partition("=")
        reference, _, input_name = target.rpartition(".")
        if not has_value or not reference or not input_name:
            raise Refused(f"--set {override!r}: expected NODE.input=value, e.g. --set 3.seed=5")
        node_id = _find_node(prompt, reference, override)
        entry = prompt[node_id]
        spec = (object_info.get(entry["class_type"]) or {}).get("input") or {}
        known = list(spec.get("required") or {}) + list(spec.get("optional") or {})
        if input_name not in known and input_name not in entry["inputs"]:
            raise Refused(f"--set {override!r}: node {node_id} ({entry['class_type']}) has no input {input_name!r}; "
                          f"its inputs: {', '.join(known or entry['inputs'])}")
        entry["inputs"][input_name] = parse_value(raw)


# --------------------------------------------------------------------------- errors


def refusal_message(body: dict, prompt: dict) -> str:
    """The server's /prompt refusal (HTTP 400) as one message: a line per node error, naming the
    node, its class, the input and what is wrong."""
    error = body.get("error") or {}
    node_errors = body.get("node_errors") or {}
    head = error.get("message", "") if isinstance(error, dict) else str(error)
    if isinstance(error, dict) and error.get("details") and not node_errors:
        head += f": {error['details']}"
    lines = [f"ComfyUI refused the prompt: {_shorten(head or body)}"]
    for node_id, node_error in node_errors.items():
        class_type = node_error.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for err in node_error.get("errors") or []:
            extra = err.get("extra_info") or {}
            name = extra.get("input_name")
            where = f"node {node_id} ({class_type})" + (f" input {name!r}" if name else "")
            config = extra.get("input_config")
            if err.get("type") == "value_not_in_list" and config and isinstance(config[0], list):
                choices = config[0]
                shown = ", ".join(repr(c) for c in choices[:5]) + (", ..." if len(choices) > 5 else "")
                what = (f"{extra.get('received_value')!r} is not one of the {len(choices)} choices the server has"
                        f"{': ' + shown if choices else ''} (for a model: is the file in the right models folder?)")
            elif err.get("type") == "custom_validation_failed" and err.get("details"):
                details = err["details"]  # "<input> - <the node's own message>"
                what = details[len(f"{name} - "):] if name and details.startswith(f"{name} - ") else details
            else:
                details = err.get("details")
                what = err.get("message", "") + (f" ({details})" if details and details != name else "")
            lines.append(f"  {where}: {_shorten(what)}")
    return "\n".join(lines)


def _execution_failure(entry: dict, prompt: dict) -> ExecutionFailed | None:
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event in ("execution_error", "execution_interrupted"):
            node_id = str(data.get("node_id"))
            class_type = data.get("node_type") or prompt.get(node_id, {}).get("class_type", "?")
            if event == "execution_interrupted":
                return ExecutionFailed(f"the prompt was interrupted at node {node_id} ({class_type})")
            exception_type = str(data.get("exception_type")).rsplit(".", 1)[-1]  # not the module's file path
            return ExecutionFailed(f"node {node_id} ({class_type}) failed: {exception_type}: "
                                   f"{_shorten(data.get('exception_message', ''), 2000)}")
    if (entry.get("status") or {}).get("status_str") == "error":
        return ExecutionFailed("the prompt failed (the server recorded no error message)")
    return None


# --------------------------------------------------------------------------- progress


class Progress:
    """Prints one line per node as the server reports it, with the share of the prompt's nodes done."""

    def __init__(self, prompt: dict, prompt_id: str, log: Log):
        self.prompt, self.prompt_id, self.log = prompt, prompt_id, log
        self.done: set[str] = set()
        self.current: str | None = None
        self.shown_step: dict[str, int] = {}
        self.failed = False
        self.started = time.time()

    def _name(self, node_id: str) -> str:
        entry = self.prompt.get(node_id)
        if entry is None:
            return f"node {node_id}"
        title = _title(entry)
        return f"node {node_id} {entry['class_type']}" + (f" ({title})" if title != entry["class_type"] else "")

    def _percent(self) -> int:
        return min(99, 100 * len(self.done) // max(1, len(self.prompt)))

    def on_event(self, message: dict) -> bool:
        """Handle one websocket JSON message; True when the prompt has finished."""
        kind, data = message.get("type"), message.get("data") or {}
        if data.get("prompt_id") not in (None, self.prompt_id):
            return False
        if kind == "execution_cached" and data.get("nodes"):
            self.done.update(str(n) for n in data["nodes"])
            self.log(f"[{self._percent():3d}%] cached: {', '.join(self._name(str(n)) for n in data['nodes'])}")
        elif kind == "executing" and "prompt_id" in data:
            if self.current is not None:
                self.done.add(self.current)
            node = data.get("display_node") or data.get("node")
            if node is None:
                seconds = time.time() - self.started
                self.log(f"[stopped] after {seconds:.1f} s" if self.failed else f"[100%] finished in {seconds:.1f} s")
                return True
            self.current = str(node)
            self.log(f"[{self._percent():3d}%] {self._name(self.current)}")
        elif kind == "progress":
            node, value, total = str(data.get("node")), int(data.get("value", 0)), max(1, int(data.get("max", 1)))
            step = 10 * value // total  # a line per tenth, so long samplings stay readable
            if value == total or step > self.shown_step.get(node, -1):
                self.shown_step[node] = step
                self.log(f"       {self._name(node)}: {value}/{total} ({100 * value // total}%)")
        elif kind in ("execution_error", "execution_interrupted"):
            self.failed = True
            self.log(f"       {kind.replace('_', ' ')} in {self._name(str(data.get('node_id')))}")
        return False

    def on_binary(self, payload: bytes) -> None:
        text = progress_text(payload)
        if text is not None:  # else a preview
            node_id, message = text
            self.log(f"       {self._name(node_id)}: {_shorten(message)}")


def progress_text(payload: bytes) -> tuple[str, str] | None:
    """(node id, text) of a binary websocket message that is a node's progress text, else None. Binary messages:
    4-byte big-endian type; type 3 is progress text (4-byte node id length, node id, text)."""
    if len(payload) < 8 or int.from_bytes(payload[:4], "big") != 3:
        return None
    size = int.from_bytes(payload[4:8], "big")
    return payload[8:8 + size].decode(errors="replace"), payload[8 + size:].decode(errors="replace")


def websocket_url(server: Server, client_id: str) -> str:
    parts = urllib.parse.urlsplit(server.url)
    return urllib.parse.urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, parts.path + "/ws",
                                    urllib.parse.urlencode({"clientId": client_id}), ""))


async def _follow_websocket(server: Server, prompt: dict, client_id: str, log: Log) -> str:
    assert aiohttp is not None  # run() calls this only where aiohttp was imported
    try:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(websocket_url(server, client_id), heartbeat=30) as ws:
            prompt_id = _queue(server, prompt, client_id, log)  # after connecting: no event is missed
            progress = Progress(prompt, prompt_id, log)
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT and progress.on_event(json.loads(message.data)):
                    return prompt_id
                if message.type == aiohttp.WSMsgType.BINARY:
                    progress.on_binary(message.data)
    except aiohttp.ClientError as e:
        raise Unreachable(f"lost the websocket of ComfyUI at {server.url} ({e})") from e
    raise Unreachable(f"ComfyUI at {server.url} closed the websocket before the prompt finished")


def _queue(server: Server, prompt: dict, client_id: str, log: Log) -> str:
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
    if status != 200:
        raise Refused(refusal_message(body, prompt))
    log(f"queued prompt {body['prompt_id']} ({len(prompt)} nodes) on {server.url}")
    return body["prompt_id"]


def _finished_entry(server: Server, prompt_id: str) -> dict | None:
    entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
    return entry if entry and (entry.get("status") or {}).get("completed") is not None else None


def _in_queue(server: Server, prompt_id: str) -> bool:
    queue = server.get_json("/queue")
    return any(len(item) > 1 and item[1] == prompt_id
               for item in (queue.get("queue_running") or []) + (queue.get("queue_pending") or []))


def _wait_for_history(server: Server, prompt_id: str) -> dict:
    while True:
        entry = _finished_entry(server, prompt_id)
        if entry:
            return entry
        if not _in_queue(server, prompt_id):
            entry = _finished_entry(server, prompt_id)  # it may have finished between the two requests
            if entry:
                return entry
            raise ExecutionFailed(f"prompt {prompt_id} left the queue without a result (was it cancelled?)")
        time.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------- outputs


def save_images(server: Server, entry: dict, out_dir: Path, log: Log) -> list[Path]:
    """Download every image of the prompt's outputs (``/view``) into ``out_dir``."""
    saved = []
    for outputs in (entry.get("outputs") or {}).values():
        for image in outputs.get("images") or []:
            if not isinstance(image, dict) or "filename" not in image:
                continue
            query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                            "type": image.get("type", "output")})
            # server-given names stay inside out_dir
            parts = [p for p in PurePosixPath(str(image.get("subfolder", "")).replace("\\", "/")).parts
                     if p not in ("/", ".", "..")]
            target = Path(out_dir, *parts, PurePosixPath(image["filename"].replace("\\", "/")).name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(server.get_bytes(f"/view?{query}"))
            log(f"saved {target}")
            saved.append(target)
    return saved


def run(workflow: dict, server_url: str = DEFAULT_SERVER, out_dir: Path | str = DEFAULT_OUT,
        overrides: list[str] | tuple[str, ...] = (), log: Log = _print) -> list[Path]:
    """Queue ``workflow`` (UI or API format, with ``overrides`` applied) on the server, follow it to
    the end and save its images into ``out_dir``; returns their paths. Raises :class:`RunError`."""
    server = Server(server_url)
    object_info = server.get_json("/object_info")
    prompt = to_api_prompt(workflow, object_info)
    apply_overrides(prompt, list(overrides), object_info)
    client_id = uuid.uuid4().hex
    if aiohttp is not None:
        prompt_id = asyncio.run(_follow_websocket(server, prompt, client_id, log))
    else:
        prompt_id = _queue(server, prompt, client_id, log)
        log("waiting for the result (no aiohttp here: no progress, polling /history)")
    entry = _wait_for_history(server, prompt_id)
    failure = _execution_failure(entry, prompt)
    if failure:
        raise failure
    return save_images(server, entry, Path(out_dir), log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixofshow_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="workflow JSON, UI or API format")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.input=value",
                        help="change an input before queuing; NODE is a node id or title (repeatable)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI server URL (default {DEFAULT_SERVER})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the images (default ./{DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.workflow}: {e}", file=sys.stderr)
        return Refused.exit_code
    try:
        run(workflow, args.server, args.out, args.overrides)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"stopped waiting; a queued prompt goes on running on {args.server}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
