import pytest

from harness.cli import adhoc_cell, parse_cell_options
from harness.matrix import Cell, MatrixError, check_version, load_matrix


def test_release_lanes_cover_the_required_combinations(matrix):
    combos = {(c.transformers, c.peft) for c in matrix.lanes}
    for required in [("4.57.6", "0.18.1"), ("4.57.6", "0.19.1"), ("5.5.0", "0.18.1"), ("5.5.0", "0.19.1"),
                     ("5.6.2", "0.18.1"), ("5.6.2", "0.19.1"), ("5.6.2", "0.22.0"), ("latest", "latest")]:
        assert required in combos
    assert all(c.trl_why for c in matrix.lanes), "every lane records why its trl was chosen"


def test_only_the_newest_lane_floats(matrix):
    """Every other release lane pins each package it installs (its own, accelerate, datasets) and resolves the rest
    as the index stood on fixed_index_date, so its verdicts can only move with the code."""
    floating = [c.name for c in matrix.lanes if not c.fixed]
    assert floating == ["tflatest-peftlatest-trllatest-torch2.14.1", "tflatest-peftlatest-trllatest"]
    assert matrix.lanes[-1].name == "tflatest-peftlatest-trllatest"  # nox -s reproduce and [archs] read the last one
    assert matrix.environment["fixed_index_date"]


def test_a_lane_of_its_own_torch_is_declared_as_data(matrix, monkeypatch):
    """The torch 2.14 lane: the [[lane]] table's torch key, read by the installer; every other lane takes
    [environment]'s torch."""
    from harness import install

    monkeypatch.delenv("MOE_SHIMS_TORCH", raising=False)
    own = [c for c in matrix.lanes if c.torch]
    assert [(c.transformers, c.peft, c.torch) for c in own] == [("latest", "latest", "2.14.1")]
    assert install.requirements(own[0], matrix.environment)[0] == "torch==2.14.1"
    others = {install.requirements(c, matrix.environment)[0] for c in matrix.lanes if not c.torch}
    assert others == {f"torch=={matrix.environment['torch']}"}


def test_a_fixed_lane_installs_exact_pins_under_the_index_date(matrix):
    from harness import install

    fixed = next(c for c in matrix.lanes if c.fixed)
    reqs = install.requirements(fixed, matrix.environment)
    assert all("==" in r for r in reqs), reqs
    assert install.exclude_newer(fixed, matrix.environment) == matrix.environment["fixed_index_date"]
    newest = next(c for c in matrix.lanes if not c.fixed)
    assert install.exclude_newer(newest, matrix.environment) is None


def test_full_cross_product_is_4x3x3_and_marks_lanes(matrix):
    cells = matrix.full_cells()
    assert len(cells) == 36
    assert len({c.name for c in cells}) == 36
    assert any(c.lane for c in cells) and not all(c.lane for c in cells)


def test_archs_are_non_square(matrix):
    hidden = matrix.arch_common["hidden_size"]
    for arch in matrix.archs.values():
        inter = arch.config.get("moe_intermediate_size", arch.config.get("intermediate_size"))
        assert 2 * inter != hidden, arch.name
        assert inter != hidden, arch.name


def test_case_specs_cross_archs_and_quants(matrix):
    specs = matrix.case_specs(True, ["qwen3_moe", "mixtral"], None, cache_dir="c", work_dir="w")
    quants = list(matrix.quants)
    assert "nf4-recipe" in quants
    assert [(s["arch"], s["quant"]) for s in specs] == [(a, q) for a in ("qwen3_moe", "mixtral") for q in quants]
    assert all(s["shims_on"] for s in specs)


@pytest.mark.parametrize("bad", ["5.6", "5.6.2.1.9", "v5.6.2", "5.x", "", "newest"])
def test_malformed_versions_are_rejected_with_the_value(bad):
    if bad == "5.6":  # two components are a valid release number
        assert check_version("peft", bad) == "5.6"
        return
    with pytest.raises(MatrixError, match="malformed"):
        check_version("peft", bad)


def test_cell_requirements_pin_exactly_or_float_for_latest():
    assert Cell("5.6.2", "latest", "1.4.0").requirements() == ["transformers==5.6.2", "peft", "trl==1.4.0"]


def test_unknown_arch_names_the_value_and_the_allowed(matrix):
    with pytest.raises(MatrixError) as exc:
        parse_cell_options(["--arch", "qwen3_moe,llama"], matrix)
    assert "'llama'" in str(exc.value) and "qwen3_moe" in str(exc.value) and "gpt_oss" in str(exc.value)


def test_unknown_option_and_mode_are_rejected(matrix):
    with pytest.raises(MatrixError, match="unknown option"):
        parse_cell_options(["--transfomers", "5.6.2"], matrix)
    with pytest.raises(MatrixError, match="allowed: off, on"):
        parse_cell_options(["--mode", "maybe"], matrix)
    with pytest.raises(MatrixError, match="unknown quant"):
        parse_cell_options(["--quant", "int8"], matrix)


def test_adhoc_cell_needs_all_three_versions(matrix):
    opts = parse_cell_options(["--transformers", "5.6.2", "--peft", "0.19.1"], matrix)
    with pytest.raises(MatrixError, match="--trl"):
        adhoc_cell(opts)
    opts = parse_cell_options(["--transformers", "5.6.2", "--peft", "0.19.1", "--trl", "latest"], matrix)
    assert adhoc_cell(opts).name == "tf5.6.2-peft0.19.1-trllatest"


def test_malformed_matrix_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "matrix.toml"
    bad.write_text('[environment]\npython = "3.11"\n')
    with pytest.raises(MatrixError, match="malformed matrix"):
        load_matrix(bad)


def test_bench_cells_cover_every_label_the_bench_targets_read():
    from harness.campaigns import bench
    from harness.matrix import load_matrix

    labels = {key.split(":")[0] for target in bench.TARGETS for key, _ in (target[1], target[2])}
    assert set(load_matrix().bench_cells()) == labels
