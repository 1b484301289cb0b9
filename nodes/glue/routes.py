"""The small HTTP routes the web UI uses: an ED-LoRA file's concept tokens (before a run), pose boxes
from the detector Regions from Pose uses, and the shipped pose images."""
from __future__ import annotations

import asyncio
import functools
import json
import os

from safetensors import safe_open

from ...fusion.errors import EDLoRAError
from ...fusion.files.bundle import is_bundle
from ...fusion.files.edlora import load_edlora
from ..names import ROUTE_POSE_BOXES, ROUTE_POSES, ROUTE_TOKENS
from .folders import edlora_path
from .images import DEFAULT_MARGIN, pose_boxes_for, pose_path


@functools.lru_cache(maxsize=64)
def _file_tokens(path: str, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    if is_bundle(path):
        with safe_open(path, framework="pt") as f:
            concepts = json.loads((f.metadata() or {}).get("concepts", "[]"))
        return tuple(tok for c in concepts for tok in c.get("tokens", ()))
    return tuple(load_edlora(path).tokens)


def tokens_of(edlora_name: str) -> list[str]:
    """The concept tokens a Load ED-LoRA file defines (what the node shows and autocomplete offers)."""
    path = edlora_path(edlora_name)
    stat = os.stat(path)
    return list(_file_tokens(path, stat.st_mtime_ns, stat.st_size))


def _error(web, status: int, e: Exception):
    return web.json_response({"error": str(e)}, status=status)


def register_routes() -> None:
    """Adds the web UI's routes to ComfyUI's server (absent when the pack is imported without one)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    routes = server.routes

    @routes.get(ROUTE_TOKENS)
    async def get_tokens(request):
        name = request.query.get("name", "")
        try:
            tokens = await asyncio.get_running_loop().run_in_executor(None, tokens_of, name)
        except FileNotFoundError as e:
            return _error(web, 404, e)
        except (EDLoRAError, ValueError, OSError) as e:
            return _error(web, 400, e)
        return web.json_response({"name": name, "tokens": tokens})

    @routes.post(ROUTE_POSE_BOXES)
    async def post_pose_boxes(request):
        try:
            body = await request.json()
            source = body.get("image") or {}
            result = await asyncio.get_running_loop().run_in_executor(
                None, pose_boxes_for, source, body.get("margin", DEFAULT_MARGIN))
        except FileNotFoundError as e:
            return _error(web, 404, e)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            return _error(web, 400, e)
        return web.json_response(result)

    @routes.get(ROUTE_POSES)
    async def get_pose(request):
        try:
            path = pose_path(request.match_info["name"])
        except ValueError as e:
            return _error(web, 404, e)
        return web.FileResponse(path)
