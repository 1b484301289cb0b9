"""Pure-torch core of the pack: no ComfyUI imports here."""
