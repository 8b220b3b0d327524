"""The kernel-variation check: one lane run twice with other CPU kernels must give the same verdicts.

Machines of one kind have different CPUs, and bf16 (and, with other thread counts, fp32 reduction order) values move
with the kernels torch picks. A verdict is trustworthy only if it does not: this module runs a lane's cases under
each VARIANT (torch's kernel set via ATEN_CPU_CAPABILITY, the torch thread count via MOE_SHIMS_THREADS), then
compares, per case and shims mode, the verdict, every stage's status and every rule's pass / fail / n/a. Any
difference is a rule that depends on the machine: exit 1. Values that differ without moving a verdict (the reported-
only bf16 KLs) are counted, which shows the variation reached the kernels at all.

    nox -s reproduce [-- --arch qwen3_moe --quant nf4-recipe]     -> reports/REPRODUCE.md, exit 0 same / 1 differs
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import verdict
from ..matrix import Cell, Matrix
from ..results import load_dir, write_text_atomic

# Each variant is an environment for the case processes. The default kernels with one thread is how the lanes run;
# avx2 is torch's other x86 kernel set (no AVX512-BF16: bf16 matmuls take another code path), with two threads.
VARIANTS: dict[str, dict[str, str]] = {
    "default kernels, 1 thread": {"MOE_SHIMS_THREADS": "1"},
    "ATEN_CPU_CAPABILITY=avx2, 2 threads": {"ATEN_CPU_CAPABILITY": "avx2", "MOE_SHIMS_THREADS": "2"},
}
# The cases where kernels matter most: bf16 compute (the recipe) and 4-bit loads; override with --quant.
DEFAULT_QUANTS = ("nf4", "nf4-recipe")
EXIT_SAME, EXIT_DIFFERENT, EXIT_BAD = 0, 1, 2


@contextmanager
def environment(extra: dict[str, str]):
    """os.environ with ``extra`` set (the case processes inherit it: harness/runner.py child_env), then restored."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rule_outcomes(case: dict) -> dict[str, str]:
    """Every rule's outcome on one case record: pass, fail, or n/a where it does not apply."""
    return {r.name: ("pass" if r.holds(case) else "fail") if r.applies(case) else "n/a" for r in verdict.RULES}


def case_signature(case: dict) -> dict:
    """What must not depend on the machine: the verdict, each stage's status and each rule's outcome."""
    return {"verdict": verdict.judge(case)[0],
            "stages": {name: s.get("status") for name, s in case.get("stages", {}).items()},
            "rules": rule_outcomes(case)}


@dataclass
class Comparison:
    cases: int = 0
    differences: list[str] = field(default_factory=list)  # "mode arch/quant: what differs"
    values_moved: int = 0     # numeric metrics that differ between the variants (with equal verdicts)
    values_compared: int = 0
    examples: list[str] = field(default_factory=list)     # a few moved values, to show the kernels did change

    @property
    def same(self) -> bool:
        return self.cases > 0 and not self.differences


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compare(runs: dict[str, list[dict]]) -> Comparison:
    """``runs``: variant -> its results documents. Cases are matched by (mode, case id); a case one variant lacks is
    a difference too."""
    indexed = {v: {(d["mode"], c["case"]): c for d in docs for c in d.get("cases", [])} for v, docs in runs.items()}
    (first, a), *others = indexed.items()
    out = Comparison()
    for other, b in others:
        for key in sorted(set(a) | set(b)):
            label = f"{key[0]} {key[1]}"
            if key not in a or key not in b:
                out.differences.append(f"{label}: only in {first if key in a else other}")
                continue
            out.cases += 1
            sa, sb = case_signature(a[key]), case_signature(b[key])
            if sa["verdict"] != sb["verdict"]:
                out.differences.append(f"{label}: verdict {sa['verdict']} ({first}) vs {sb['verdict']} ({other})")
            for part in ("stages", "rules"):
                for name in sorted(set(sa[part]) | set(sb[part])):
                    if sa[part].get(name) != sb[part].get(name):
                        out.differences.append(f"{label}: {part[:-1]} {name}: {sa[part].get(name)} ({first}) vs "
                                               f"{sb[part].get(name)} ({other})")
            _count_moved_values(a[key].get("metrics", {}), b[key].get("metrics", {}), label, out)
    return out


def _count_moved_values(ma: dict, mb: dict, label: str, out: Comparison) -> None:
    timing = ("seconds", "_s", "rss", "mib", "peak")
    for name in sorted(set(ma) & set(mb)):
        if any(t in name for t in timing) or not (_numeric(ma[name]) and _numeric(mb[name])):
            continue
        out.values_compared += 1
        if ma[name] != mb[name]:
            out.values_moved += 1
            if len(out.examples) < 8 and name.startswith("kl_"):
                out.examples.append(f"{label} {name}: {ma[name]:.3g} vs {mb[name]:.3g}")


def render(cell: Cell, result: Comparison, cpu: str) -> str:
    lines = [f"# Kernel-variation check ({cell.name})", "",
             f"One lane run once per variant on {cpu}; verdicts, stage statuses and every rule's outcome must be "
             "identical. Generated by `nox -s reproduce` (harness/campaigns/reproduce.py).", "",
             "| variant | environment of the case processes |", "| --- | --- |"]
    lines += [f"| {name} | {' '.join(f'{k}={v}' for k, v in env.items())} |" for name, env in VARIANTS.items()]
    verdict_line = ("**same**: every verdict, stage and rule outcome identical" if result.same
                    else f"**DIFFERENT**: {len(result.differences)} difference(s)")
    lines += ["", f"- cases x modes compared: {result.cases}", f"- result: {verdict_line}",
              f"- numeric values that moved between the variants (verdicts unchanged): {result.values_moved} of "
              f"{result.values_compared}", ""]
    if result.examples:
        lines += ["Values that moved (reported only, see the report's verdict rules):", ""]
        lines += [f"- {e}" for e in result.examples]
        lines.append("")
    if result.differences:
        lines += ["Differences (a rule that depends on the machine):", ""]
        lines += [f"- {d}" for d in result.differences[:200]]
        lines.append("")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def jobs_for(extra: dict[str, str], cpus: int | None = None) -> int:
    """Case processes side by side for a variant: never more torch threads than CPUs. Two 2-thread processes on 2
    cores made one variant's first cases 20-30x slower than the other's (a case timed out: measured in CI), so a
    variant's verdicts would depend on the machine's load, which is what this check must not measure."""
    threads = max(1, int(extra.get("MOE_SHIMS_THREADS", "1")))
    return max(1, (cpus or os.cpu_count() or 1) // threads)


def run(cell: Cell, python: str, matrix: Matrix, work: Path, out: Path, archs=None, quants=None,
        install: dict | None = None) -> int:
    """Run ``cell`` once per variant (shims off and on), compare, write ``out``; return the exit code."""
    from .. import runner

    runs = {}
    for index, (name, extra) in enumerate(VARIANTS.items()):
        folder = work / f"variant-{index}"
        with environment({**extra, "MOE_SHIMS_JOBS": str(jobs_for(extra))}):
            runner.run_modes(cell, ("off", "on"), python, matrix, folder / "results", folder / "work", archs,
                             quants or list(DEFAULT_QUANTS), install)
        docs, problems = load_dir(folder / "results")
        if problems or not docs:
            print(f"reproduce: {name}: unusable results: {[p.problem for p in problems] or 'none written'}")
            return EXIT_BAD
        runs[name] = docs
    result = compare(runs)
    write_text_atomic(out, render(cell, result, cpu_name()))
    print(f"reproduce: {result.cases} case(s) x modes; {len(result.differences)} difference(s); "
          f"{result.values_moved}/{result.values_compared} values moved -> {out}")
    for line in result.differences[:20]:
        print(f"  {line}")
    return EXIT_SAME if result.same else EXIT_DIFFERENT
