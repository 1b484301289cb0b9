"""Follow one prompt on a real ComfyUI server through its websocket (the events the web UI gets),
and interrupt it at a chosen moment: when an event says it has got that far (e.g. a progress step
of a given node), ``POST /interrupt`` names the prompt. Every wait is bounded. The requests, the
websocket address and the binary progress-text frames are the headless runner's (mixofshow_run)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from comfy_server import ComfyServer

import mixofshow_run

FINISHED = ("execution_success", "execution_error", "execution_interrupted")


@dataclass
class Interrupted:
    prompt_id: str
    events: list[dict] = field(default_factory=list)  # {"type", "data"} of this prompt, in order
    trigger: dict | None = None  # the event after which /interrupt was sent
    seconds_to_trigger: float = 0.0  # from queuing to that event
    seconds_to_stop: float = 0.0  # from /interrupt to the prompt's last event

    @property
    def last(self) -> str:
        return self.events[-1]["type"] if self.events else ""

    def last_step(self, node_id: str) -> int:
        """The last progress step the server reported for ``node_id`` (0 if none)."""
        steps = [int(e["data"]["value"]) for e in self.events if e["type"] == "progress"
                 and str(e["data"].get("node")) == node_id]
        return steps[-1] if steps else 0

    @property
    def interrupted_node(self) -> str | None:
        """The node the server says it stopped in (its execution_interrupted event)."""
        return self.events[-1]["data"].get("node_id") if self.last == "execution_interrupted" else None


def interrupt(server: ComfyServer, prompt_id: str) -> int:
    """``POST /interrupt`` for one prompt (the server ignores it unless that prompt is running)."""
    return server.post_json("/interrupt", {"prompt_id": prompt_id})[0]


def _text_event(data: bytes, prompt_id: str) -> dict | None:
    """A node's progress text as an event ``{"type": "progress_text", "data": {"node", "text", "prompt_id"}}``;
    None for other binary frames. The frame names no prompt: this client queues one prompt at a time."""
    text = mixofshow_run.progress_text(data)
    if text is None:
        return None
    return {"type": "progress_text", "data": {"node": text[0], "text": text[1], "prompt_id": prompt_id}}


def stage_text_of(node_id: str, starts_with: str) -> Callable[[dict], bool]:
    """``ready`` for :func:`interrupt_when`: node ``node_id`` shows a stage text starting with ``starts_with``."""
    def ready(event: dict) -> bool:
        data = event.get("data") or {}
        return event.get("type") == "progress_text" and str(data.get("node")) == node_id \
            and str(data.get("text", "")).startswith(starts_with)
    return ready


async def _interrupt_when(server: ComfyServer, graph: dict, ready: Callable[[dict], bool]) -> Interrupted:
    client_id = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(mixofshow_run.websocket_url(server, client_id), heartbeat=30) as ws:
        # queued after connecting, so no event of the prompt is missed (mixofshow_run.Refused if refused)
        run = Interrupted(await loop.run_in_executor(None, mixofshow_run._queue, server, graph, client_id,
                                                     lambda line: None))
        queued = interrupted_at = time.monotonic()
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                event = _text_event(message.data, run.prompt_id)
                if event is None:
                    continue  # previews
            elif message.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(message.data)
            else:
                continue
            if (event.get("data") or {}).get("prompt_id") != run.prompt_id:
                continue
            run.events.append(event)
            if run.trigger is None and ready(event):
                run.trigger, run.seconds_to_trigger = event, time.monotonic() - queued
                interrupted_at = time.monotonic()
                await loop.run_in_executor(None, interrupt, server, run.prompt_id)
            if event["type"] in FINISHED:
                run.seconds_to_stop = time.monotonic() - interrupted_at if run.trigger else 0.0
                return run
    raise RuntimeError(f"the websocket closed before prompt {run.prompt_id} finished")


def interrupt_when(server: ComfyServer, graph: dict, ready: Callable[[dict], bool],
                   timeout: float = 120) -> Interrupted:
    """Queue ``graph``; send ``/interrupt`` for it after the first of its events for which ``ready``
    is true; return when it has finished (interrupted, or not) and is in ``/history``, with its events."""
    run = asyncio.run(asyncio.wait_for(_interrupt_when(server, graph, ready), timeout))
    deadline = time.monotonic() + 30  # the websocket event comes just before the history entry
    while run.prompt_id not in server.get_json(f"/history/{run.prompt_id}"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt {run.prompt_id} finished but has no /history entry after 30 s")
        time.sleep(0.1)
    return run


def progress_of(node_id: str, at_least: int = 1, total_at_least: int = 1) -> Callable[[dict], bool]:
    """``ready`` for :func:`interrupt_when`: a progress event of node ``node_id`` at step
    ``at_least`` or later of a bar of at least ``total_at_least`` steps."""
    def ready(event: dict) -> bool:
        data = event.get("data") or {}
        return event.get("type") == "progress" and str(data.get("node")) == node_id \
            and int(data.get("value", 0)) >= at_least and int(data.get("max", 0)) >= total_at_least
    return ready
