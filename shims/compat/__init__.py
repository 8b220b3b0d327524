"""Upstream quirks of particular archs or releases, one patch each: branch dtype reads, causal-LM backbones, hub kernels offline, expert-count aliases, routing-weight dtypes."""
