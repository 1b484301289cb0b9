"""Files the pack reads and writes: untrusted reading of ``.pth`` / ``.safetensors`` (``filecheck``: archive
and pickle checks, tensor checks), the ED-LoRA format (``edlora``: Mix-of-Show ``.pth``, the flat layout, kohya
XTI) and the fused bundle (``bundle``)."""
