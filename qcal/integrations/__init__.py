"""Bridges to other libraries' model formats (transformers' quantizer registry, compressed-tensors)."""
