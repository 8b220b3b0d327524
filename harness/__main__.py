"""python -m harness report|list|gate|baseline ... (see --help).

    report    --results DIR [--results DIR2 ...]  merge results folders into reports/COMPAT.md, append the
              history (reports/history.jsonl) when verdicts changed, draw reports/heatmap.png
    gate      --results DIR [...] --baseline reports/baseline.json   exit 0 pass, 1 fail, 2 bad input
              (see harness/gate.py)
    baseline  --results DIR [...] --out reports/baseline.json        accept these results as the baseline
    second-pass [--work DIR]  re-run the stages that awaited other cells' publications (after every lane ran)
    mutations --python PY [--cell-python CELL=PY] [NAME ...]   the mutation check with existing interpreters
"""

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
    rep.add_argument("--results", type=Path, action="append", default=None,
                     help="a results folder; repeat to merge several (default: reports/results)")
    rep.add_argument("--out", type=Path, default=REPO / "reports" / "COMPAT.md")
    rep.add_argument("--title", default="release lanes")
    rep.add_argument("--history", type=Path, default=None, help="default: history.jsonl beside --out")
    rep.add_argument("--heatmap", type=Path, default=None, help="default: heatmap.png beside --out")
    gate = sub.add_parser("gate", help="release gate: current results vs the committed baseline (exit 0/1/2)")
    gate.add_argument("--results", type=Path, action="append", default=None,
                      help="a results folder; repeat to merge several (default: reports/results)")
    gate.add_argument("--baseline", type=Path, default=REPO / "reports" / "baseline.json")
    base = sub.add_parser("baseline", help="accept results as the new baseline (explicit; the gate never does)")
    base.add_argument("--results", type=Path, action="append", default=None,
                      help="a results folder; repeat to merge several (default: reports/results)")
    base.add_argument("--out", type=Path, default=REPO / "reports" / "baseline.json")
    sub.add_parser("list", help="print the release lanes and archs as JSON")
    sc = sub.add_parser("sweep-cells", help="the sweep's cells as JSON (a CI matrix: one job per cell)")
    sc.add_argument("options", nargs=argparse.REMAINDER, help="--transformers / --peft / --minor as for nox -s sweep")
    sw = sub.add_parser("sweep-report", help="reports/SWEEP.md (+ .png) from sweep results (harness/campaigns/sweep.py)")
    sw.add_argument("--results", type=Path, action="append", default=None,
                    help="a sweep results folder; repeat to merge several (default: reports/sweep/results)")
    sw.add_argument("--out", type=Path, default=REPO / "reports" / "SWEEP.md")
    sv = sub.add_parser("serve-report", help="reports/SERVE.md from the serving results (harness/campaigns/serve.py)")
    sv.add_argument("--results", type=Path, default=REPO / "reports" / "serve" / "results")
    sv.add_argument("--out", type=Path, default=REPO / "reports" / "SERVE.md")
    bench = sub.add_parser("bench", help="side-by-side benchmark -> reports/BENCH.md")
    bench.add_argument("--interp", action="append", required=True,
                       help="label=command: tf5=<python with transformers 5.x>, tf457=<python with 4.57>")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    for dim in ("hidden", "experts", "top-k", "moe-intermediate", "vocab", "layers", "heads", "kv-heads"):
        bench.add_argument(f"--{dim}", type=int, default=None)
    for opt, default in (("batch", None), ("seq", None), ("rank", None), ("steps", None), ("new-tokens", None)):
        bench.add_argument(f"--{opt}", type=int, default=default)
    bench.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    bench.add_argument("--out", type=Path, default=REPO / "reports" / "BENCH.md")
    bench.add_argument("--json", type=Path, default=REPO / "reports" / "bench.json")
    depth = sub.add_parser("bench-depth", help="full-depth QLoRA benchmark -> reports/BENCH-depth.md")
    depth.add_argument("--python", required=True, help="command of the interpreter that runs the cases (5.x + shims)")
    depth.add_argument("--python457", default="", help="command of a transformers 4.57 interpreter (peer row)")
    depth.add_argument("--python-peers", default="", help="command of an interpreter with the peer packages "
                                                          "(experts4bit-qlora, unsloth) importable")
    depth.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    depth.add_argument("--full", action="store_true", help="Qwen3-30B-A3B / DeepSeek-V3 shapes (GPU); else small dims")
    depth.add_argument("--only", default="", help="comma-separated run names (default: all; the build always runs)")
    depth.add_argument("--timeout-s", type=float, default=1800)
    depth.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-depth")
    depth.add_argument("--out", type=Path, default=REPO / "reports" / "BENCH-depth.md")
    depth.add_argument("--json", type=Path, default=REPO / "reports" / "bench-depth.json")
    dr = sub.add_parser("bench-depth-render", help="render BENCH-depth.md from one or more bench-depth JSON files")
    dr.add_argument("--json", type=Path, action="append", required=True, help="a bench-depth JSON; repeat to merge")
    dr.add_argument("--out", type=Path, default=REPO / "reports" / "BENCH-depth.md")
    dr.add_argument("--out-json", type=Path, default=REPO / "reports" / "bench-depth.json")
    rc = sub.add_parser("run-cell", help="run the cases with an existing interpreter (e.g. on a GPU machine)")
    rc.add_argument("--python", required=True, help="interpreter that has torch/transformers/peft/trl")
    rc.add_argument("--results", type=Path, required=True)
    rc.add_argument("--work", type=Path, default=REPO / ".cache" / "e2e")
    rc.add_argument("options", nargs=argparse.REMAINDER, help="--arch/--quant/--mode/--device as for nox -s e2e")
    sp = sub.add_parser("second-pass", help="after every lane ran: re-run the stages that found nothing published "
                                            "yet (per_expert_adapters on 4.57 before the 5.x lanes) in the cells' "
                                            "own interpreters, into their results files")
    sp.add_argument("--work", type=Path, default=REPO / ".cache" / "e2e", help="the --work of the runs")
    mu = sub.add_parser("mutations", help="the mutation check with existing interpreters (nox -s mutations installs "
                                          "them): plant each bug, count how many the verdict rules catch")
    mu.add_argument("names", nargs="*", help="mutations to plant (default: [mutations] planted in matrix.toml)")
    mu.add_argument("--python", required=True, help="interpreter of the [mutations] cell")
    mu.add_argument("--cell-python", action="append", default=[], metavar="CELL=PYTHON",
                    help="interpreter of a [mutations.elsewhere] cell, by cell name (repeat)")
    mu.add_argument("--work", type=Path, default=REPO / ".cache" / "e2e")
    mu.add_argument("--out", type=Path, default=REPO / "reports" / "mutations.json")
    ar = sub.add_parser("archs", help="discover every MoE arch of an interpreter's transformers, run it shims off "
                                      "and on, write reports/ARCHS.md")
    ar.add_argument("--python", required=True, help="interpreter of the archs cell (torch/transformers/peft/trl)")
    ar.add_argument("--only", default="", help="comma-separated discovered archs to run (default: all)")
    ar.add_argument("--lane", default="", help="a release lane by name (default: the [archs] cell); its report is "
                                               "reports/ARCHS-<lane>.md, its results reports/archs-<lane>/")
    ar.add_argument("--out-dir", type=Path, default=None, help="results folder (default: see --lane)")
    ar.add_argument("--work", type=Path, default=REPO / ".cache" / "e2e" / "archs")
    args = parser.parse_args(argv)
    results = getattr(args, "results", None) or [REPO / "reports" / "results"]
    try:
        if args.command == "report":
            from .reporting.report import write_report

            out = write_report(results, args.out, args.title, history_path=args.history,
                               heatmap_path=args.heatmap)
            print(f"wrote {out}")
        elif args.command == "sweep-cells":
            from . import cli
            from .campaigns import sweep as sweep_mod

            opts = cli.parse_with(cli.sweep_parser(), [o for o in args.options if o != "--"])
            cells = sweep_mod.cells(
                sweep_mod.select(opts.transformers, sweep_mod.published_releases("transformers"), "transformers",
                                 opts.minor),
                sweep_mod.select(opts.peft, sweep_mod.published_releases("peft"), "peft"), "latest")
            print(json.dumps([{"transformers": c.transformers, "peft": c.peft, "id": c.name} for c in cells]))
        elif args.command == "sweep-report":
            from .campaigns import sweep as sweep_mod

            folders = args.results or [REPO / "reports" / "sweep" / "results"]
            print(f"wrote {sweep_mod.write(folders, args.out)}")
        elif args.command == "serve-report":
            from .campaigns import serve as serve_mod

            print(f"wrote {serve_mod.write_report(args.results, args.out)}")
        elif args.command == "gate":
            from . import gate as gate_mod

            return gate_mod.run(results, args.baseline)
        elif args.command == "baseline":
            from . import gate as gate_mod

            return gate_mod.accept(results, args.out)
        elif args.command == "bench":
            from .campaigns import bench as bench_mod

            dims = {k: getattr(args, k) for k in bench_mod.DIM_FLAGS}
            run_opts = {"device": args.device, "batch": args.batch, "seq": args.seq, "rank": args.rank,
                        "steps": args.steps, "new_tokens": args.new_tokens}
            doc = bench_mod.run_bench(bench_mod.parse_interpreters(args.interp), dims, run_opts, args.work)
            bench_mod.write(doc, args.out, args.json)
            print(bench_mod.render(doc))
        elif args.command == "bench-depth":
            from .campaigns import bench_depth

            args.command_line = "python -m harness " + " ".join(argv if argv is not None else sys.argv[1:])
            print(bench_depth.render(bench_depth.main_args(args)))
        elif args.command == "bench-depth-render":
            from .campaigns import bench_depth

            try:
                doc = bench_depth.merge_docs([json.loads(p.read_text(encoding="utf-8")) for p in args.json])
            except (ValueError, KeyError, OSError) as exc:  # json.JSONDecodeError is a ValueError
                print(f"error: cannot merge {[str(p) for p in args.json]}: {exc!r}", file=sys.stderr)
                return 2
            bench_depth.write(doc, args.out, args.out_json)
            print(f"wrote {args.out}")
        elif args.command == "run-cell":
            from .cli import parse_cell_options
            from .runner import interpreter_cell, run_modes

            matrix = load_matrix()
            opts = parse_cell_options([o for o in args.options if o != "--"], matrix)
            cell = interpreter_cell(args.python)
            for path in run_modes(cell, opts.mode, args.python, matrix.on_device(opts.device), args.results,
                                  args.work, opts.arch, opts.quant):
                print(f"wrote {path}")
        elif args.command == "second-pass":
            from .runner import run_second_pass

            for summary in run_second_pass(args.work):
                print(f"second pass: {summary['results']}: {len(summary['cases'])} case(s) re-ran "
                      f"{', '.join(summary['stages']) or 'nothing'} ({summary['seconds']} s)")
        elif args.command == "mutations":
            from .campaigns import mutations as mut

            pythons = dict(item.split("=", 1) for item in args.cell_python)
            matrix = load_matrix()
            missing = [g["cell"].name for g in matrix.mutation_groups(args.names or None)
                       if g["cell"].name != matrix.mutation_cell().name and g["cell"].name not in pythons]
            if missing:
                raise MatrixError(f"no interpreter for mutation cell(s) {', '.join(missing)}: pass --cell-python "
                                  f"{missing[0]}=/path/to/python")
            score = mut.run_mutations(matrix, args.python, args.work / "mutations", args.work, args.names or None,
                                      pythons)
            mut.write_score(score, args.out)
            print(f"mutations caught: {score['caught']} / {score['planted']} -> {args.out}")
        elif args.command == "archs":
            from .campaigns import archs as archs_mod

            from .cli import archs_cell

            matrix = load_matrix()
            only = [a for a in args.only.split(",") if a] or None
            cell = archs_cell(args.lane, matrix)
            out_dir, report = archs_mod.report_paths(cell, matrix)
            work = args.work if cell.name == matrix.archs_cell().name else args.work.with_name(f"archs-{cell.name}")
            print(f"wrote {archs_mod.run(cell, args.python, matrix, args.out_dir or out_dir, work, only, report)}")
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
