"""Installing a cell: unresolvable pins end as a classified error carrying uv's own message."""

import shutil
import subprocess
import sys

import pytest

from harness import install
from harness.matrix import Cell, MatrixError

pytestmark = pytest.mark.slow


@pytest.fixture
def empty_venv(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    return str(venv / "bin" / "python")


@pytest.mark.parametrize("cell", [
    Cell("5.6.2", "0.19.1", "0.0.999"),        # a release that does not exist
    Cell("4.46.0", "0.19.1", "1.16.0"),        # trl 1.16 declares transformers>=4.56.2: a conflict
])
def test_unresolvable_pins_are_classified_with_the_resolvers_words(empty_venv, cell):
    env = {"torch": "2.13.0", "bitsandbytes": "latest", "accelerate": "latest", "datasets": "latest"}
    with pytest.raises(install.InstallError) as exc:
        install.install(empty_venv, cell, env, timeout_s=300)
    assert exc.value.status == "unresolvable", exc.value.message
    assert "trl" in exc.value.message and ("0.0.999" in exc.value.message or "4.46.0" in exc.value.message)


def test_requirements_take_the_torch_override(monkeypatch):
    monkeypatch.setenv("MOE_SHIMS_TORCH", "torch==9.9.9+cu999")
    reqs = install.requirements(Cell("5.6.2", "latest", "1.4.0"), {"torch": "2.13.0", "bitsandbytes": "0.50.2",
                                                                   "accelerate": "latest", "datasets": "latest"})
    assert reqs[:4] == ["torch==9.9.9+cu999", "transformers==5.6.2", "peft", "trl==1.4.0"]


def test_find_links_prefer_the_explicit_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_SHIMS_FIND_LINKS", f"{tmp_path} /other")
    assert install.find_links() == [str(tmp_path), "/other"]


ENV = {"torch": "2.13.0", "bitsandbytes": "0.50.2", "accelerate": "latest", "datasets": "latest"}


def test_a_cell_of_its_own_torch_pins_it_and_is_named_for_it(monkeypatch):
    monkeypatch.delenv("MOE_SHIMS_TORCH", raising=False)
    cell = Cell("latest", "latest", "latest", lane=True, torch="2.14.1")
    assert cell.name == "tflatest-peftlatest-trllatest-torch2.14.1" and cell.as_dict()["torch"] == "2.14.1"
    assert install.requirements(cell, ENV)[0] == "torch==2.14.1"
    assert install.requirements(Cell("latest", "latest", "latest"), ENV)[0] == "torch==2.13.0"
    monkeypatch.setenv("MOE_SHIMS_TORCH", "torch==9.9.9")  # replaces [environment]'s pin, not a lane's own torch
    assert install.requirements(cell, ENV)[0] == "torch==2.14.1"
    assert install.requirements(Cell("latest", "latest", "latest"), ENV)[0] == "torch==9.9.9"
    for bad in ("latest", "2.x"):
        with pytest.raises(MatrixError, match="torch version"):
            Cell("latest", "latest", "latest", torch=bad)


def _local_index(tmp_path):
    """A PEP 503 index (file://) whose pages link into a files folder beside it, as this machine kind's are."""
    files, simple = tmp_path / "files", tmp_path / "simple"
    files.mkdir()
    (files / "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (simple / "torch").mkdir(parents=True)
    (simple / "torch" / "index.html").write_text(
        '<a href="../../files/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl#sha256=00">torch</a>'
        '<a href="../../files/missing.whl#sha256=00">gone</a>')
    return files, simple


def test_local_index_folders_are_read_from_pips_file_indexes(monkeypatch, tmp_path):
    files, simple = _local_index(tmp_path)
    monkeypatch.delenv("MOE_SHIMS_FIND_LINKS", raising=False)
    monkeypatch.setattr(install, "_pip_config_values",
                        lambda *keys: [f"file://{simple}", "https://example.invalid/simple"] if "index-url" in keys
                        else ["/wheels"])
    assert install.local_index_folders() == [str(files.resolve())]
    # only a cell that pins its own torch looks there; every other cell keeps pip's find-links alone
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    assert install.wheel_folders(Cell("latest", "latest", "latest", torch="2.14.1")) == ["/wheels", str(files.resolve())]
    assert install.wheel_folders(Cell("latest", "latest", "latest")) == ["/wheels"]
    monkeypatch.setenv("MOE_SHIMS_FIND_LINKS", "/mine")  # explicit folders replace both
    assert install.wheel_folders(Cell("latest", "latest", "latest", torch="2.14.1")) == ["/mine"]
