import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from harness.reporting.heatmap import COLOURS, grid, write_heatmap  # noqa: E402
from harness.matrix import Cell  # noqa: E402
from harness.reporting.merge import load_many  # noqa: E402
from harness.reporting.report import frame  # noqa: E402
from harness.results import results_name, write_json_atomic  # noqa: E402
from tests.harness.conftest import passing_case, results_doc  # noqa: E402

CELL = Cell("5.6.2", "0.19.1", "1.4.0", lane=True)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def df_for(tmp_path, matrix, nf4_native_ok):
    nf4 = passing_case(quant="nf4")
    if not nf4_native_ok:
        nf4["metrics"]["experts_quantized"] = 0
    write_json_atomic(tmp_path / results_name(CELL.name, "off"), results_doc(CELL, "off", [passing_case(), nf4]))
    write_json_atomic(tmp_path / results_name(CELL.name, "on"),
                      results_doc(CELL, "on", [passing_case(), passing_case(quant="nf4")]))
    return frame(load_many([tmp_path]), matrix)


def colour_present(png, name):
    pixels = imread(png)[:, :, :3]
    target = to_rgb(COLOURS[name][0])
    return bool((abs(pixels - target).max(axis=2) < 1.5 / 255).any())


def test_grid_layout_cell_level_rows_fill_their_mode(tmp_path, matrix):
    df = df_for(tmp_path, matrix, nf4_native_ok=False)
    cells, columns, values = grid(df)
    assert columns[:4] == [("qwen3_moe/bf16", "native"), ("qwen3_moe/bf16", "shims"),
                           ("qwen3_moe/nf4", "native"), ("qwen3_moe/nf4", "shims")]
    row = dict(zip(columns, values[cells.index(CELL.name)]))
    assert row[("qwen3_moe/nf4", "native")] == "fail" and row[("qwen3_moe/nf4", "shims")] == "pass"
    missing_lane = next(c for c in cells if c != CELL.name)  # every other lane: "missing" in both modes
    assert set(values[cells.index(missing_lane)]) == {"missing"}


def test_heatmap_is_a_valid_png_with_the_verdict_colours(tmp_path, matrix):
    red = write_heatmap(df_for(tmp_path / "a", matrix, nf4_native_ok=False), tmp_path / "red.png")
    green = write_heatmap(df_for(tmp_path / "b", matrix, nf4_native_ok=True), tmp_path / "green.png")
    for png in (red, green):
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert imread(png).shape[0] > 100
        assert colour_present(png, "pass") and colour_present(png, "missing")
    assert colour_present(red, "fail")
    assert not colour_present(green, "fail")
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
