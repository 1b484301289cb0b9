"""Gradient fusion: the plan and the three stages (``gradient_fusion``), the per-layer closed-form and L-BFGS
solves (``solver``), and the on-disk cache with its key digests (``cache``)."""
