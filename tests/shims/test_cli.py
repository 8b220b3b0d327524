"""python -m shims convert-adapter: argument handling and clear errors (conversion itself: test_layout)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shims.__main__ import main


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["convert-adapter", str(tmp_path / "nope"), str(tmp_path / "dst"), "--to", "standard"]) == 2
    err = capsys.readouterr().err
    assert "not a saved peft adapter" in err and "Traceback" not in err
    assert not (tmp_path / "dst").exists()


def test_bad_choice_is_rejected_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert-adapter", str(tmp_path), str(tmp_path / "dst"), "--to", "sideways"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_existing_destination_is_refused(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "dst").mkdir()
    assert main(["convert-adapter", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "standard"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.needs_ml
def test_module_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shims", "convert-adapter", str(tmp_path), str(tmp_path / "d"),
                          "--to", "fused"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "error:" in out.stderr
