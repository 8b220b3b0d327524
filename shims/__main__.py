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
    check = sub.add_parser("check-adapter", help="what does an engine do with this adapter's expert LoRA layout? "
                                                 "exit 0 it loads as it is, 1 it does not (the conversion and/or "
                                                 "engine options that fix it are printed), 2 bad input")
    check.add_argument("adapter", help="saved peft adapter folder")
    check.add_argument("--engine", required=True, choices=("vllm", "sglang", "transformers"))
    check.add_argument("--base-config", default=None,
                       help="base model folder, config.json or hub id in the local HF cache (default: the "
                            "adapter's base_model_name_or_path)")
    check.add_argument("--transformers-version", default=None, help="--engine transformers: default installed")
    check.add_argument("--peft-version", default=None, help="--engine transformers: default installed")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    return parser


# bad input -> exit 2 with the message; AmbiguousLayoutError and PerExpertNotApplicable are ValueErrors
_BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)


def _convert(args) -> int:
    from .adapters.adapter_convert import convert_adapter

    try:
        record = convert_adapter(args.src, args.dst, to=args.to, base_config=args.base_config,
                                 layout=args.layout, overwrite=args.overwrite)
    except _BAD_INPUT as exc:
        print(f"moe-shims convert-adapter: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, sort_keys=True))
    return 0


def _check(args) -> int:
    from .adapters.engine_check import check_adapter

    try:
        verdict = check_adapter(args.adapter, args.engine, base_config=args.base_config,
                                transformers_version=args.transformers_version, peft_version=args.peft_version)
    except _BAD_INPUT as exc:
        print(f"moe-shims check-adapter: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(verdict.as_dict(), sort_keys=True))
    else:
        print(f"{verdict.engine}: {'compatible' if verdict.compatible else 'NOT compatible'} ({verdict.outcome}): "
              f"{verdict.reason}")
        if verdict.options:
            calls = ", ".join(f"{owner}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
                              for owner, kw in verdict.options.items())
            print(f"loads with engine options: {calls}")
        if verdict.conversion:
            print(f"fix: {verdict.conversion}")
        elif not verdict.compatible:
            print("fix: no conversion can make it readable" if verdict.needed is None else
                  "fix: no conversion command does it (the reason above says what to change)")
        print(f"(rules: {verdict.source}; rule {verdict.rule})")
    return verdict.exit_code


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return _check(args) if args.command == "check-adapter" else _convert(args)


if __name__ == "__main__":
    sys.exit(main())
