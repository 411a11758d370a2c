"""``florence-kit report``: a self-contained page with metrics, curves and examples, checked in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from florence_kit.cli import app

runner = CliRunner()


def _invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def demo_like(tiny_dir: Path, docvqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's layout from the real commands: eval-before/ (random model), finetuned/ (2 steps), eval-after/."""
    root = tmp_path_factory.mktemp("report") / "run"
    common = ["--dataset", str(docvqa_dir), "--batch-size", "8", "--quiet"]
    _invoke("eval", "docvqa", "--model", tiny_dir, "--output-dir", root / "eval-before", *common,
            "--max-new-tokens", "4")
    _invoke("finetune", "docvqa", "--model", tiny_dir, "--output-dir", root / "finetuned", "--max-steps", "2",
            "--lr", "1e-3", *common)
    _invoke("eval", "docvqa", "--model", root / "finetuned", "--output-dir", root / "eval-after", *common,
            "--max-new-tokens", "4")
    return root


def test_eval_keeps_a_small_thumbnail_per_example(demo_like: Path) -> None:
    records = [json.loads(x) for x in (demo_like / "eval-after" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for index, rec in enumerate(records):
        assert rec["thumbnail"] == f"thumbs/{index:06d}.jpg"
        with Image.open(demo_like / "eval-after" / rec["thumbnail"]) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 256


def test_report_opens_in_chromium_with_plots_and_sortable_examples(demo_like: Path, tmp_path: Path) -> None:
    from browser import assert_not_blank, open_page

    output = _invoke("report", demo_like)
    page_path = demo_like / "report.html"
    assert str(page_path) in output.replace("\n", "")
    text = page_path.read_text()
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text, re.I)
    assert "url(" not in text and "@import" not in text

    after = json.loads((demo_like / "eval-after" / "metrics.json").read_text())
    records = [json.loads(x) for x in (demo_like / "eval-after" / "predictions.jsonl").read_text().splitlines()]
    before = json.loads((demo_like / "eval-before" / "metrics.json").read_text())
    with open_page(page_path.as_uri()) as (page, log):
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        stats = assert_not_blank(shot)
        # metric summary: before, after and the change, read from metrics.json
        header = page.locator("#summary tr").first.inner_text().split()
        assert header == ["metric", "before", "after", "change"]
        anls_row = page.locator("#summary tr", has_text="anls").first.inner_text().split()
        assert anls_row[1:3] == [f"{before['anls']:.4f}", f"{after['anls']:.4f}"]
        # loss and learning-rate plots, decoded (an image that failed would have naturalWidth 0)
        plots = page.locator("img.plot")
        assert sorted(plots.evaluate_all("els => els.map(e => e.alt)")) == ["learning rate", "training loss"]
        assert min(plots.evaluate_all("els => els.map(e => e.naturalWidth)")) > 100
        # one row per example, each with its thumbnail decoded, worst first
        rows = page.locator("#examples tbody tr")
        assert rows.count() == after["n"] == 8
        widths = page.locator("#examples tbody img").evaluate_all("els => els.map(e => e.naturalWidth)")
        assert len(widths) == 8 and min(widths) > 0

        def column(name: str) -> list[str]:
            index = page.locator("#examples thead th").all_inner_texts().index(name)
            return page.locator(f"#examples tbody tr td:nth-child({index + 1})").all_inner_texts()

        headers = page.locator("#examples thead th").all_inner_texts()
        assert headers == ["#", "image", "question", "prediction", "references", "score", "prediction before",
                           "score before"]
        scores = [float(s) for s in column("score")]
        assert scores == sorted(scores)
        questions = column("question")
        page.locator("#examples thead th", has_text="question").click()
        assert column("question") == sorted(questions)
        page.locator("#examples thead th", has_text="question").click()
        assert column("question") == sorted(questions, reverse=True)
        page.locator("#examples thead th", has_text="#").click()
        assert column("#") == [str(r["id"]) for r in records]  # back in predictions.jsonl order
    assert log.errors == [] and log.failed_requests == [], log
    assert stats["height"] > 900  # the full page: summary, plots and 8 rows do not fit one screen


def test_report_sorts_worst_first_and_caps_the_rows(tmp_path: Path) -> None:
    """Hand-made eval folder: the order and the cap are checked against known scores."""
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    records = [{"id": f"q{i}", "prompt": f"<DocVQA>question {i}?", "prediction": str(i), "references": ["3"],
                "score": score} for i, score in enumerate([1.0, 0.25, None, 0.0, 0.5])]
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (eval_dir / "metrics.json").write_text(json.dumps({"metric": "anls", "anls": 0.4375, "n": 5, "n_scored": 4}))
    _invoke("report", eval_dir, "--max-examples", "3", "--output", tmp_path / "out")
    text = (tmp_path / "out" / "report.html").read_text()
    ids = re.findall(r'<tr class="example"><td class="num" data-sort="\d+">(q\d)</td>', text)
    assert ids == ["q3", "q1", "q4"]  # 0.0, 0.25, 0.5: the unscored row and the perfect one are left out
    assert "the 3 lowest-scoring of 5" in text and "question 3?" in text and "&lt;DocVQA&gt;" not in text
    assert "Training" not in text and "no thumbnail" in text  # an eval folder alone: no curves, no images


def test_error_rates_count_down_as_better_and_list_the_highest_first(tmp_path: Path) -> None:
    """OCR's CER/WER: a drop is green, the worst examples are the highest error rates."""
    run = tmp_path / "run"
    for label, cer, wer, scores in (("eval-before", 0.6, 0.8, [0.9, 0.4, 0.6]), ("eval-after", 0.2, 0.3,
                                                                                  [0.0, 0.5, 0.1])):
        folder = run / label
        folder.mkdir(parents=True)
        records = [{"id": f"p{i}", "prompt": "<OCR>", "prediction": "x", "references": ["y"], "score": score}
                   for i, score in enumerate(scores)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / "metrics.json").write_text(json.dumps({"metric": "cer", "cer": cer, "wer": wer, "n": 3,
                                                         "n_scored": 3, "higher_is_better": False}))
    _invoke("report", run, "--max-examples", "2")
    text = (run / "report.html").read_text()
    assert re.search(r'<tr><th>cer</th>.*?<td class="num better">-0\.4000</td>', text)
    assert re.search(r'<tr><th>wer</th>.*?<td class="num better">-0\.5000</td>', text)  # from the registry
    ids = re.findall(r'<tr class="example"><td class="num" data-sort="\d+">(p\d)</td>', text)
    assert ids == ["p1", "p2"]  # 0.5 then 0.1: the highest error rates first
    assert "the 2 highest-scoring of 3" in text and 'data-dir="desc">score' in text
    assert 'class="num score-bad" data-sort="0.500000"' in text  # per-example colour follows the direction


def test_training_plots_include_every_logged_eval_metric() -> None:
    from florence_kit.present.report import training_plots

    log = [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 6)]
    log += [{"step": 2, "eval/anls": 0.1, "eval/exact_match": 0.0}, {"step": 4, "eval/anls": 0.3}]
    plots = training_plots(log)
    assert list(plots) == ["training loss", "learning rate", "evaluation over steps"]
    for uri in plots.values():
        assert uri.startswith("data:image/png;base64,") and len(uri) > 1000
    assert list(training_plots([{"step": 1, "loss": 1.0}])) == ["training loss"]


def test_run_folder_without_evaluations_gets_curves_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 1e-5}\n{"step": 2, "loss": 1.5, "lr": 2e-5}\n'
                                       '{"step": 3, "lo')  # a torn last line from an interrupted run
    (run / "config.yaml").write_text("task: docvqa\nmode: lora\nlr: 2.0e-05\n")
    _invoke("report", run)
    text = (run / "report.html").read_text()
    assert text.count('class="plot"') == 2 and "<th>mode</th><td>lora</td>" in text and 'id="examples"' not in text


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: p, "holds no predictions.jsonl"),
])
def test_report_on_a_folder_without_results_exits_2(tmp_path: Path, make, message: str) -> None:
    result = runner.invoke(app, ["report", str(make(tmp_path))])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "report.html").exists()


def _task_folder(folder: Path, task: str, metric: str, scores: list[float], higher_is_better: bool) -> dict:
    folder.mkdir(parents=True)
    records = [{"id": f"{task}-{i}", "prompt": f"q{i}", "prediction": f"p{i}", "references": ["r"], "score": s}
               for i, s in enumerate(scores)]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = {"metric": metric, "n": len(scores), "n_scored": len(scores), metric: sum(scores) / len(scores),
               "higher_is_better": higher_is_better, "task": task}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_report_of_a_several_task_eval_has_a_column_and_a_sortable_table_per_task(tmp_path: Path) -> None:
    from browser import open_page

    from florence_kit.evaluate.scoring import write_summary

    root = tmp_path / "eval"  # what `eval grp` writes: grp/a/, grp/b/ (task names hold a slash) + summary.json
    scored = {"grp/a": _task_folder(root / "grp" / "a", "grp/a", "anls", [0.9, 0.1, 0.5], True),
              "grp/b": _task_folder(root / "grp" / "b", "grp/b", "cer", [0.2, 0.7, 0.0, 0.4], False)}
    write_summary(scored, root)
    _invoke("report", root)
    with open_page((root / "report.html").as_uri()) as (page, log):
        assert page.locator("#summary tr").first.inner_text().split() == ["metric", "grp/a", "grp/b"]  # no "change"
        assert "Metrics of 2 tasks" in page.locator("h2").all_inner_texts()
        assert page.locator("h2", has_text="Examples").all_inner_texts() == ["Examples (grp/a)", "Examples (grp/b)"]

        def ids(table: int) -> list[str]:
            return page.locator(f"table.examples >> nth={table}").locator("tbody tr td:nth-child(1)").all_inner_texts()

        assert ids(0) == ["grp/a-1", "grp/a-2", "grp/a-0"]  # ANLS: lowest first
        assert ids(1) == ["grp/b-1", "grp/b-3", "grp/b-0", "grp/b-2"]  # CER: highest first
        page.locator("table.examples >> nth=1").locator("thead th", has_text="#").click()
        assert ids(1) == ["grp/b-0", "grp/b-1", "grp/b-2", "grp/b-3"]  # the clicked table sorts
        assert ids(0) == ["grp/a-1", "grp/a-2", "grp/a-0"]  # the other does not
    assert log.errors == [], log


def test_report_of_a_summary_naming_a_missing_folder_exits_2(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"tasks": {"a": {"folder": "a"}}}))
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "names a but no predictions.jsonl" in result.output


def test_eval_files_are_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """With a non-UTF-8 locale (Windows' cp1252, an un-coerced POSIX one) writing a non-ASCII answer used to crash."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path\n"
        "from florence_kit.evaluate.scoring import EvalResult, write_results, read_predictions\n"
        "out = Path(sys.argv[1])\n"
        "rec = {'prediction': 'caf\\u00e9 \\u4fe1\\u53f7', 'references': ['caf\\u00e9']}\n"
        "write_results(EvalResult({'metric': 'anls', 'anls': 1.0}, [rec]), out)\n"
        "assert read_predictions(out / 'predictions.jsonl')[0]['prediction'] == rec['prediction']\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "eval")], env=env, capture_output=True,
                          text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    line = (tmp_path / "eval" / "predictions.jsonl").read_bytes().decode("utf-8")
    assert "caf\u00e9 \u4fe1\u53f7" in line
