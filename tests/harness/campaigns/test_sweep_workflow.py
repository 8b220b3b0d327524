"""A dry run of .github/workflows/sweep.yml: every command its jobs run is one the harness accepts, the cell matrix
has the fields the jobs read, and the store the publisher uploads is the folder the cells' stages read."""

import json
import re
import shlex
from pathlib import Path

import pytest

from harness import cli
from harness.campaigns import sweep
from harness.matrix import load_matrix

yaml = pytest.importorskip("yaml")
WORKFLOW = Path(__file__).resolve().parents[3] / ".github" / "workflows" / "sweep.yml"
NOXFILE = Path(__file__).resolve().parents[3] / "noxfile.py"


@pytest.fixture(scope="module")
def jobs():
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]


def _runs(job):
    return [step["run"] for step in job["steps"] if "run" in step]


def _sweep_args(command: str, cell: dict) -> list[str]:
    command = command.replace("${{ matrix.cell.transformers }}", cell["transformers"])
    command = command.replace("${{ matrix.cell.peft }}", cell["peft"])
    words = shlex.split(command)
    return words[words.index("--") + 1:]


def test_every_sweep_command_parses(jobs):
    cell = {"transformers": "5.6.2", "peft": "0.19.1", "id": "x"}
    commands = [c for job in jobs.values() for c in _runs(job) if "nox -s sweep" in c]
    assert len(commands) == 2  # the publisher and the cell job
    for command in commands:
        opts = cli.parse_with(cli.sweep_parser(), _sweep_args(command, cell))
        assert opts.results == "reports/sweep/results"
    cell_opts = cli.parse_with(cli.sweep_parser(), _sweep_args(_runs(jobs["cell"])[-1], cell))
    assert cell_opts.no_publisher and cell_opts.no_report and cell_opts.transformers == "5.6.2"


def test_the_cell_matrix_has_the_fields_the_jobs_read(jobs, monkeypatch):
    monkeypatch.setattr(sweep, "published_releases", lambda package: ["5.5.0", "5.6.2"] if package == "transformers"
                        else ["0.19.1", "0.22.0"])
    from harness.__main__ import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["sweep-cells", "--", "--transformers", "5.5.0..latest", "--peft", "0.19.1,latest"]) in (0, None)
    cells = json.loads(out.getvalue())
    assert [c["id"] for c in cells] == ["tf5.5.0-peft0.19.1-trllatest", "tf5.5.0-peft0.22.0-trllatest",
                                        "tf5.6.2-peft0.19.1-trllatest", "tf5.6.2-peft0.22.0-trllatest"]
    used = set(re.findall(r"matrix\.cell\.(\w+)", WORKFLOW.read_text()))
    assert used <= set(cells[0]), used


def test_the_shared_store_is_where_the_cells_look(jobs):
    """The runner's store is <work root>/adapters; the sweep's work root is WORK / "sweep" (noxfile)."""
    upload = next(s for s in jobs["publisher"]["steps"] if s.get("with", {}).get("name") == "sweep-store")
    download = next(s for s in jobs["cell"]["steps"] if s.get("with", {}).get("name") == "sweep-store")
    assert upload["with"]["path"] == download["with"]["path"] == ".cache/e2e/sweep/adapters/"
    text = NOXFILE.read_text()
    assert 'WORK = REPO / ".cache" / "e2e"' in text and 'WORK / "sweep"' in text


def test_the_report_job_merges_every_cell(jobs):
    merge = _runs(jobs["report"])[-1]
    assert "python -m harness sweep-report" in merge and "--results" in merge
    assert jobs["report"]["needs"] == ["cell"] and jobs["report"]["if"] == "always()"


def test_sharding_splits_the_cells_without_overlap():
    items = list(range(7))
    parts = [cli.shard(items, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(x for p in parts for x in p) == items
    assert load_matrix().sweep["archs"]
