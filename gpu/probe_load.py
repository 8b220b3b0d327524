"""Where does a 4-bit load's GPU peak happen? Prints allocated / peak GPU memory (GiB) after the warm-up
reservation and after every loader step that raised the peak, for a checkpoint loaded with the shims applied.

    PYTHONPATH=. python3 gpu/probe_load.py CHECKPOINT_DIR     (on a CUDA machine; see gpu/run.sh for the wheels)
"""
import sys

import torch
sys.path.insert(0, ".")
import shims
shims.apply()
import transformers.core_model_loading as cml, transformers.modeling_utils as mu
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
G = 2**30
events = []
def mark(what):
    torch.cuda.synchronize()
    events.append((what, torch.cuda.memory_allocated() / G, torch.cuda.max_memory_allocated() / G))
def wrap(owner, name, label):
    orig = getattr(owner, name)
    def w(*a, **k):
        r = orig(*a, **k)
        mark(f"{label} {a[1] if len(a) > 1 and isinstance(a[1], str) else ''}")
        return r
    setattr(owner, name, w)
wrap(cml, "set_param_for_module", "set")
wrap(cml.WeightConverter, "convert", "convert")
if hasattr(mu, "caching_allocator_warmup"):
    wrap(mu, "caching_allocator_warmup", "warmup")
path = sys.argv[1]
torch.cuda.reset_peak_memory_stats()
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
mark("done")
prev = 0
for what, a, p in events:
    if p > prev + 0.01 or what.startswith(("warmup", "done")):
        print(f"{what:70s} alloc {a:.3f} peak {p:.3f}")
    prev = max(prev, p)
