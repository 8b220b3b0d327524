"""Command line (also ``moe-shims``):

    python -m shims convert-adapter SRC DST --to standard|swapped|fused|per_expert [--base-config DIR]
    python -m shims check-adapter DIR --engine vllm|sglang|transformers [--base-config DIR]
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-shims", description="moe-shims tools")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert-adapter", help="convert a saved LoRA adapter's expert layout")
    conv.add_argument("src", help="saved peft adapter folder")
    conv.add_argument("dst", help="destination folder (written atomically)")
    conv.add_argument("--to", required=True, choices=("standard", "swapped", "fused", "per_expert"),
                      help="standard: peft >= 0.19.1 (and peft 0.18 on gpt_oss); swapped: peft 0.18 (and "
                           "peft >= 0.19.1 on 4.57's gpt_oss); fused: transformers 4.57 per-expert -> 5.x; "
                           "per_expert: 5.x fused -> 4.57 per-expert modules (also what SGLang and most of vLLM read)")
    conv.add_argument("--layout", default="standard", choices=("standard", "swapped"),
                      help="with --to fused: the peft convention of the fused output (default standard)")
    conv.add_argument("--base-config", default=None,
                      help="base model folder, config.json or hub id in the local HF cache (default: the adapter's "
                           "base_model_name_or_path; needed for per_expert, peft 0.18 adapters and square dims)")
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .adapter_convert import AmbiguousLayoutError, convert_adapter

    try:
        record = convert_adapter(args.src, args.dst, to=args.to, base_config=args.base_config,
                                 layout=args.layout, overwrite=args.overwrite)
    except (AmbiguousLayoutError, ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as exc:
        print(f"moe-shims convert-adapter: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
