"""peft LoRA on 4-bit experts: training (peft_experts), the fast routed path (fast_lora), peft <-> transformers version breaks (peft_compat), FSDP2 (fsdp)."""
