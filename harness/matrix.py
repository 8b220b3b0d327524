"""Read and validate harness/matrix.toml: the version cells, tiny archs, quantizations and run settings."""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

MATRIX_FILE = Path(__file__).with_name("matrix.toml")
LATEST = "latest"
_VERSION = re.compile(r"^\d+(\.\d+){0,3}([a-z]+\d*)?$")
PACKAGES = ("transformers", "peft", "trl")
SUPPORT_PACKAGES = ("accelerate", "datasets")  # pinned by a fixed lane itself, else taken from [environment]
MODES = ("off", "on")


class MatrixError(ValueError):
    """A bad matrix entry or command-line value; the message names the value and the allowed ones."""


def check_version(package: str, value: str) -> str:
    value = str(value).strip()
    if value != LATEST and not _VERSION.match(value):
        raise MatrixError(f"{package} version {value!r} is malformed: use an exact release like 5.6.2, or 'latest'")
    return value


def pin(package: str, value: str) -> str:
    return package if value == LATEST else f"{package}=={value}"


@dataclass(frozen=True)
class Cell:
    transformers: str
    peft: str
    trl: str
    trl_why: str = ""
    lane: bool = False
    accelerate: str = ""  # "" = [environment]'s
    datasets: str = ""
    torch: str = ""  # "" = [environment]'s; a lane of its own torch (an exact release) is named for it

    def __post_init__(self):
        for package in PACKAGES:
            check_version(package, getattr(self, package))
        for package in SUPPORT_PACKAGES:
            if getattr(self, package):
                check_version(package, getattr(self, package))
        if self.torch and (self.torch == LATEST or not _VERSION.match(self.torch)):
            raise MatrixError(f"torch version {self.torch!r} of a cell must be an exact release like 2.14.1")

    @property
    def fixed(self) -> bool:
        """A release lane whose every version is exact: it is installed as the index stood on fixed_index_date."""
        return self.lane and all(getattr(self, p) != LATEST for p in PACKAGES) and all(
            getattr(self, p) not in ("", LATEST) for p in SUPPORT_PACKAGES)

    @property
    def name(self) -> str:
        return f"tf{self.transformers}-peft{self.peft}-trl{self.trl}" + (f"-torch{self.torch}" if self.torch else "")

    def requirements(self) -> list[str]:
        return [pin(p, getattr(self, p)) for p in PACKAGES]

    def as_dict(self) -> dict:
        return {"name": self.name, "transformers": self.transformers, "peft": self.peft, "trl": self.trl,
                "trl_why": self.trl_why, "lane": self.lane, "fixed": self.fixed,
                **{p: getattr(self, p) for p in SUPPORT_PACKAGES if getattr(self, p)},
                **({"torch": self.torch} if self.torch else {})}


@dataclass(frozen=True)
class Arch:
    name: str
    model_type: str
    attention: tuple[str, ...]
    config: dict = field(hash=False, compare=False)
    bnb: dict = field(default_factory=dict, hash=False, compare=False)  # extra BitsAndBytesConfig args (workarounds)


@dataclass(frozen=True)
class Matrix:
    environment: dict
    run: dict
    lanes: tuple[Cell, ...]
    full_axes: dict
    arch_common: dict
    archs: dict[str, Arch]
    quants: dict[str, dict]
    test_lanes: tuple[Cell, ...] = ()
    mutations: dict = field(default_factory=dict, hash=False, compare=False)
    bench: dict = field(default_factory=dict, hash=False, compare=False)
    archs_settings: dict = field(default_factory=dict, hash=False, compare=False)  # [archs]: the discovered set
    sweep: dict = field(default_factory=dict, hash=False, compare=False)  # [sweep]: nox -s sweep / bisect
    serve: dict = field(default_factory=dict, hash=False, compare=False)  # [serve]: nox -s serve

    def with_run(self, overrides: dict) -> "Matrix":
        """The same matrix with some [run] settings replaced (a shorter run for the sweep or the archs)."""
        import dataclasses

        return dataclasses.replace(self, run={**self.run, **overrides})

    def sweep_publisher(self) -> Cell | None:
        pins = self.sweep.get("publisher")
        return Cell(**pins, trl_why="sweep publisher: 4.x checkpoints and adapters") if pins else None

    def on_device(self, device: str) -> "Matrix":
        """The same matrix with its cases placed on ``device`` ("cpu" or "cuda")."""
        import dataclasses

        return dataclasses.replace(self, run={**self.run, "device": device})

    def serve_cell(self) -> Cell:
        return Cell(**self.serve["cell"], trl_why=f"the serving cell: what {self.serve['engine']} installs with")

    def serving(self) -> "Matrix":
        """The matrix as ``nox -s serve`` runs it: the engine's limits on the tiny configs applied ([serve]
        arch_common / arch_config), its shorter run, and ``run["serve"]`` (engine, LLM settings, time limit), which
        adds the serving stages to every case (cases/pipeline.stage_order)."""
        import dataclasses

        spec = self.serve
        per_arch = spec.get("arch_config", {})
        unknown = sorted(set(per_arch) - set(self.archs))
        if unknown:
            raise MatrixError(f"[serve] arch_config names unknown archs {unknown}; known: {', '.join(self.archs)}")
        archs = {name: dataclasses.replace(arch, config={**arch.config, **per_arch.get(name, {})})
                 for name, arch in self.archs.items()}
        serve = {"engine": spec["engine"], "settings": dict(spec.get("settings", {})),
                 "timeout_s": float(spec.get("timeout_s", 600))}
        return dataclasses.replace(self, arch_common={**self.arch_common, **spec.get("arch_common", {})},
                                   archs=archs, run={**self.run, **spec.get("run", {}), "serve": serve})

    def archs_cell(self) -> Cell:
        return Cell(**self.archs_settings["cell"])

    def mutation_cell(self) -> Cell:
        return Cell(**self.mutations["cell"])

    def mutation_groups(self, names=None) -> list[dict]:
        """The mutation check's runs: {cell, archs, quants, names} per cell, the default cell first. A mutation
        listed under [mutations.elsewhere] runs in its own cell and cases (its symptom shows only there)."""
        names = list(names or self.mutations["planted"])
        elsewhere = self.mutations.get("elsewhere", {})
        default = {"cell": self.mutation_cell(), "archs": self.mutations.get("archs"), "quants": None,
                   "names": [n for n in names if n not in elsewhere]}
        groups = {default["cell"].name: default}
        for name in names:
            if name in elsewhere:
                spec = elsewhere[name]
                cell = Cell(**spec["cell"])
                group = groups.setdefault(cell.name, {"cell": cell, "archs": spec.get("archs"),
                                                      "quants": spec.get("quants"), "names": []})
                group["names"].append(name)
        return [g for g in groups.values() if g["names"]]

    def bench_cells(self) -> dict[str, Cell]:
        """Interpreter label -> the cell installed for it by ``nox -s bench``."""
        return {label: Cell(**pins) for label, pins in self.bench.items()}

    def test_cells(self) -> list[Cell]:
        return list(self.test_lanes)

    def full_cells(self) -> list[Cell]:
        lane_names = {c.name for c in self.lanes}
        cells = []
        for tf, pf, tr in itertools.product(*(self.full_axes[p] for p in PACKAGES)):
            cell = Cell(tf, pf, tr)
            cells.append(Cell(tf, pf, tr, lane=cell.name in lane_names))
        return cells

    def check_archs(self, names) -> list[str]:
        names = list(names) if names else list(self.archs)
        unknown = [n for n in names if n not in self.archs]
        if unknown:
            raise MatrixError(f"unknown arch {', '.join(map(repr, unknown))}; known: {', '.join(self.archs)}")
        return names

    def check_quants(self, names) -> list[str]:
        names = list(names) if names else list(self.quants)
        unknown = [n for n in names if n not in self.quants]
        if unknown:
            raise MatrixError(f"unknown quant {', '.join(map(repr, unknown))}; known: {', '.join(self.quants)}")
        return names

    def case_specs(self, shims_on: bool, archs=None, quants=None, *, cache_dir: str, work_dir: str,
                   store_dir: str = "") -> list[dict]:
        specs = []
        for arch_name in self.check_archs(archs):
            arch = self.archs[arch_name]
            for quant in self.check_quants(quants):
                quant_spec = self.quants[quant]
                if arch.bnb and quant_spec.get("bnb"):  # only where the quantization loads through bitsandbytes
                    quant_spec = {**quant_spec, "bnb": {**quant_spec["bnb"], **arch.bnb}}
                specs.append({
                    "arch": arch.name, "model_type": arch.model_type, "quant": quant,
                    "arch_common": self.arch_common, "arch_config": arch.config, "attention": list(arch.attention),
                    "quant_spec": quant_spec, "run": self.run, "shims_on": shims_on,
                    "cache_dir": cache_dir, "work_dir": work_dir, "store_dir": store_dir,
                })
        return specs


def load_matrix(path: Path = MATRIX_FILE) -> Matrix:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    try:
        lanes = tuple(Cell(**lane, lane=True) for lane in data["lane"])
        archs = {
            name: Arch(name, spec.get("model_type", name), tuple(spec["attention"]), dict(spec.get("config", {})))
            for name, spec in data["arch"].items()
        }
        full = {p: [check_version(p, v) for v in data["full"][p]] for p in PACKAGES}
        tests = tuple(Cell(**lane) for lane in data.get("test_lane", []))
        matrix = Matrix(data["environment"], data["run"], lanes, full, data["arch_common"], archs, data["quant"],
                        tests, data.get("mutations", {}), data.get("bench", {}), data.get("archs", {}),
                        data.get("sweep", {}), data.get("serve", {}))
    except (KeyError, TypeError) as exc:
        raise MatrixError(f"{path}: malformed matrix ({type(exc).__name__}: {exc})") from exc
    names = [c.name for c in lanes]
    if len(set(names)) != len(names):
        raise MatrixError(f"{path}: duplicate release lanes in {names}")
    return matrix
