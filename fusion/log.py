"""The pack's one logger (``mixofshow``): ComfyUI's log shows it with the pack's name."""
from __future__ import annotations

import logging

log = logging.getLogger("mixofshow")
