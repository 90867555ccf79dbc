"""The benchmark plot: a PNG from a `gsp-kernels bench --json` report, and `bench --from-json --plot`."""

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread

from gsp_kernels import cli
from gsp_kernels.bench.plot import plot_report

H200_REPORT = Path(__file__).resolve().parent.parent / "bench/results/2026-11-28-h200-final/bench_compile.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert width > 400 and height > 200, (width, height)


@pytest.fixture
def h200_report() -> dict:
    return json.loads(H200_REPORT.read_text())


def figure_texts(figure) -> list[str]:
    """Every text drawn on the figure's panels (bar labels, tick labels, titles)."""
    texts = []
    for axis in figure.axes:
        texts += [text.get_text() for text in axis.texts]
        texts += [label.get_text() for label in axis.get_yticklabels()]
        texts.append(axis.get_title())
    return texts


def test_plots_the_committed_h200_report(h200_report, tmp_path):
    names = {row["name"] for row in h200_report["rows"]}
    assert {"paper", "compiled-reference", "reference"} <= names
    out = tmp_path / "bench.png"
    figure = plot_report(h200_report, str(out))
    assert_png(out)
    texts = figure_texts(figure)
    dtypes = {row["dtype"] for row in h200_report["rows"]}
    assert len([axis for axis in figure.axes if axis.get_title()]) == len(dtypes)  # one panel per dtype
    for row in h200_report["rows"]:  # each bar's label: its time and speed-up, from the JSON
        label = f"{row['ms']['fwd_bwd']:.3g}"
        speedup = f"{row['speedup_vs_paper']['fwd_bwd']:.1f}x"
        assert any(label in text and speedup in text for text in texts), (row["name"], row["dtype"], label, speedup)
    assert "paper (baseline)" in texts and "cuda" in texts


def test_failed_rows_still_plot(h200_report, tmp_path):
    report = copy.deepcopy(h200_report)
    report["rows"][0]["ms"] = {"fwd": None, "bwd": None, "fwd_bwd": None}
    report["rows"][0]["speedup_vs_paper"] = {"fwd": None, "bwd": None, "fwd_bwd": None}
    report["rows"][0]["note"] = "failed: OutOfMemoryError: CUDA out of memory; 1 input sets"
    report["rows"][1]["ms"]["fwd_bwd"] = None  # only the forward+backward phase missing
    out = tmp_path / "failed.png"
    texts = figure_texts(plot_report(report, str(out)))
    assert_png(out)
    assert sum(text.startswith("failed") for text in texts) == 2
    assert any("OutOfMemoryError" in text for text in texts)


def test_every_row_failed_or_none_still_plots(h200_report, tmp_path):
    report = copy.deepcopy(h200_report)
    for row in report["rows"]:
        row["ms"] = dict.fromkeys(row["ms"])
    plot_report(report, str(tmp_path / "all_failed.png"))
    assert_png(tmp_path / "all_failed.png")
    plot_report({"rows": []}, str(tmp_path / "empty.png"))
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE


def test_bench_from_json_plots_without_measuring(tmp_path, capsys, monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("--from-json must not run the benchmark")

    monkeypatch.setattr("gsp_kernels.bench.run_bench", no_measuring)
    out = tmp_path / "cli.png"
    assert cli.main(["bench", "--from-json", str(H200_REPORT), "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NVIDIA H200" in text and "compiled-reference" in text
    assert str(out) in text
    assert_png(out)
