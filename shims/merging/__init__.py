"""LoRA into 4-bit experts: merge / unmerge (merge), RL merge cycles (merge_cycles), the merged 16-bit export (export)."""
