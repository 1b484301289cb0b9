"""Concept prompts: concept sets and the substitution of concept tokens (``concepts``), and the context tensor
that carries one context per cross-attention layer through stock conditioning edits (``layerwise_tensor``)."""
