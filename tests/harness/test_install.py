"""Installing a cell: unresolvable pins end as a classified error carrying uv's own message."""

import shutil
import subprocess
import sys

import pytest

from harness import install
from harness.matrix import Cell

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
