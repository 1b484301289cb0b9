"""Every version the pack writes or compares, in one place.

* File formats: the flat ED-LoRA layout and the fused bundle (written into the files' metadata).
* The fusion cache: an entry is valid while the recording (what rows are recorded, how prompts are encoded and
  sampled, how patches apply) and the solver (the closed form, the ridge rule) are unchanged. Bump the one that a
  change affects; ``tests/unit/test_versions.py`` pins a digest of the code behind each and fails until it is
  bumped (or, for a change that affects neither, until the pinned digest is updated). UI, tooltip and log edits
  never evict caches.
"""
from __future__ import annotations

EDLORA_FORMAT = "mixofshow-edlora"
EDLORA_FORMAT_VERSION = "1"

# Written as "trained" into the metadata of an ED-LoRA the pack's trainer made (with its settings), so a file tells
# which trainer made it; bumped when training changes what a setting means.
TRAINING_VERSION = "1"

BUNDLE_FORMAT = "mixofshow-fused-bundle"
BUNDLE_VERSION = "2"
READABLE_BUNDLE_VERSIONS = ("1", "2")   # 0.1.0 wrote full fused weights (version 1); read only

# The fusion cache. Version 1 of each is release 0.2.0's behaviour (its entries keep hitting, see
# fusion.merge.cache.LEGACY_CODE_VERSIONS).
RECORDING_VERSION = 1
SOLVER_VERSION = 1
