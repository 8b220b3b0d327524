"""4-bit quantization of fused MoE expert parameters (transformers 5.x)."""

PATCHES: tuple = ()
