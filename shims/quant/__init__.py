"""4-bit storage of fused experts and routers: the storage primitive, BitsAndBytesConfig rules, the forward of 4-bit modules, the 5.x / 4.x loaders, pre-quantized checkpoints (5.x and 4.x)."""
