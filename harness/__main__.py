"""python -m harness report|list ... (see --help)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .matrix import MatrixError, load_matrix

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="render the markdown report from results files")
    rep.add_argument("--results", type=Path, default=REPO / "reports" / "results")
    rep.add_argument("--out", type=Path, default=REPO / "reports" / "COMPAT.md")
    rep.add_argument("--title", default="release lanes")
    sub.add_parser("list", help="print the release lanes and archs as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            from .report import write_report

            out = write_report(args.results, args.out, args.title)
            print(f"wrote {out}")
        elif args.command == "list":
            m = load_matrix()
            print(json.dumps({"lanes": [c.as_dict() for c in m.lanes], "archs": list(m.archs),
                              "quants": list(m.quants)}, indent=1))
    except MatrixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
