"""``report.html``: one self-contained page that says how a run or an evaluation went.

It reads only what the other commands already wrote: an eval folder (``predictions.jsonl``,
``metrics.json``, ``thumbs/``), a run folder (``metrics.jsonl``, ``config.yaml``) or the demo folder
(``eval-before/``, ``eval-after/``, ``finetuned/``). Plots are matplotlib PNGs and thumbnails JPEGs,
both embedded as data URIs, and sorting is a few lines of inline JS: the file can be mailed or
archived and opens the same anywhere, with no network.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from florence_kit.common.errors import UserError

if TYPE_CHECKING:
    from florence_kit.train.runfolder import RunFolder

DEFAULT_MAX_EXAMPLES = 500


@dataclass
class EvalRun:
    """One eval folder as read back from disk."""

    label: str
    path: Path
    metrics: dict[str, Any]
    records: list[dict[str, Any]]


@dataclass
class ReportInputs:
    source: Path
    evals: list[EvalRun] = field(default_factory=list)
    train_log: list[dict[str, Any]] = field(default_factory=list)
    train_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def before_after(self) -> tuple[EvalRun, EvalRun] | None:
        by_label = {e.label: e for e in self.evals}
        if "before" in by_label and "after" in by_label:
            return by_label["before"], by_label["after"]
        return None

    def several_tasks(self) -> bool:
        """A several-task eval folder (``eval a,b``): one column and one example table per task."""
        return len({e.metrics.get("task") for e in self.evals}) > 1

    def primary(self) -> EvalRun | None:
        """The evaluation whose examples are listed: the 'after' one when there is a before/after pair."""
        pair = self.before_after()
        return pair[1] if pair else (self.evals[-1] if self.evals else None)


# ---------------------------------------------------------------------------------------------
# Reading


def _label(eval_dir: Path) -> str:
    name = eval_dir.name
    for word in ("before", "after"):
        if re.search(rf"(^|[-_]){word}($|[-_])", name):
            return word
    return name


def read_eval(eval_dir: Path) -> EvalRun:
    from florence_kit.evaluate.scoring import read_predictions

    metrics_path = eval_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise UserError(f"{metrics_path}: not valid JSON ({exc.msg}); rerun `florence-kit eval`") from None
    return EvalRun(_label(eval_dir), eval_dir, metrics, read_predictions(eval_dir / "predictions.jsonl"))


def summary_folders(source: Path) -> list[tuple[str, str]]:
    """(task, folder) pairs of a several-task eval's summary.json."""
    path = source / "summary.json"
    try:
        tasks = json.loads(path.read_text())["tasks"]
        pairs = [(name, entry["folder"]) for name, entry in tasks.items()]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not a summary written by `florence-kit eval`; rerun it") from None
    missing = [folder for _, folder in pairs if not (source / folder / "predictions.jsonl").is_file()]
    if missing:
        raise UserError(f"{path} names {', '.join(missing)} but no predictions.jsonl is there; "
                        "rerun `florence-kit eval`")
    return pairs


def read_train_log(run: RunFolder) -> list[dict[str, Any]]:
    """The run's logged steps (records without a step number are left out)."""
    return [row for row in run.metrics() if isinstance(row.get("step"), (int, float))]


def find_inputs(source: Path) -> ReportInputs:
    """An eval folder, a run folder, or a folder holding either (the demo's layout)."""
    from florence_kit.train.runfolder import RunFolder

    if not source.is_dir():
        raise UserError(f"'{source}' is not a folder; pass a run folder or an eval folder")
    inputs = ReportInputs(source)
    candidates = [source, *sorted(p for p in source.iterdir() if p.is_dir())]
    eval_dirs = [p for p in candidates if (p / "predictions.jsonl").is_file()]
    if (source / "predictions.jsonl").is_file():  # an eval folder: task folders below are an earlier `eval a,b`'s
        eval_dirs = [source]
    inputs.evals = [read_eval(p) for p in eval_dirs]
    if (source / "summary.json").is_file():  # `eval a,b`: one folder per task, named in summary.json
        inputs.evals = [replace(read_eval(source / folder), label=name) for name, folder in summary_folders(source)]
    order = {"before": 0, "after": 2}
    inputs.evals.sort(key=lambda e: order.get(e.label, 1))
    run = next((RunFolder(p) for p in candidates if RunFolder(p).has_metrics()), None)
    train_dir = run.path if run is not None else None
    if run is not None:
        inputs.train_dir = run.path
        inputs.train_log = read_train_log(run)
        inputs.config = run.config()
    if not inputs.evals and train_dir is None:
        raise UserError(
            f"'{source}' holds no predictions.jsonl (an eval folder) or metrics.jsonl (a run folder); "
            "pass the --output-dir of `florence-kit eval`, `finetune` or `demo`"
        )
    return inputs


# ---------------------------------------------------------------------------------------------
# Plots


def _png_data_uri(fig: Any) -> str:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def training_plots(log: list[dict[str, Any]]) -> dict[str, str]:
    """{title: PNG data URI}: loss, learning rate, and every ``eval/*`` key logged over steps."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the report's plots need matplotlib: pip install 'florence-kit[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[str, list[str]]] = {"loss": ("training loss", ["loss"]), "lr": ("learning rate", ["lr"])}
    eval_keys = sorted({k for row in log for k in row if k.startswith("eval/")})
    if eval_keys:
        series["eval"] = ("evaluation over steps", eval_keys)
    plots = {}
    for title, keys in series.values():
        points = {k: [(r["step"], r[k]) for r in log if isinstance(r.get(k), (int, float))] for k in keys}
        if not any(points.values()):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for key, xy in points.items():
            if xy:
                ax.plot(*zip(*xy, strict=True), marker="o" if len(xy) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
        if keys == ["lr"]:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        plots[title] = _png_data_uri(fig)
        plt.close(fig)
    return plots


# ---------------------------------------------------------------------------------------------
# HTML

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;color:#1f2328;
padding:0 16px;background:#fff}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #d0d7de}
.meta{color:#57606a;font-size:.9em}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;
text-align:left}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37}.worse{color:#cf222e}
.plots img{margin:4px 12px 4px 0;border:1px solid #d0d7de}
.examples th.sortable{cursor:pointer;user-select:none}.examples th.sortable:after{content:" \\2195";color:#8c959f}
.examples img{max-width:160px;max-height:160px}
.score-bad{background:#ffebe9}.score-mid{background:#fff8c5}.score-good{background:#dafbe1}
code{background:#f6f8fa;padding:1px 4px}
"""

SORT_JS = """
document.querySelectorAll('table.examples th.sortable').forEach(function (th, _) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var col = th.cellIndex, asc = th.dataset.dir !== 'asc';
    table.querySelectorAll('th').forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = asc ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
      var nx = parseFloat(x), ny = parseFloat(y), c;
      if (!isNaN(nx) && !isNaN(ny)) { c = nx - ny; }
      else if (isNaN(nx) !== isNaN(ny)) { return isNaN(nx) ? 1 : -1; }
      else { c = String(x).localeCompare(String(y)); }
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def _question(prompt: str) -> str:
    """The prompt without its leading task token (``<DocVQA>What is ...`` → ``What is ...``)."""
    return re.sub(r"^<[A-Za-z0-9_]+>", "", prompt or "").strip() or prompt


def higher_is_better(metrics: dict[str, Any], key: str) -> bool:
    """A metric's direction: eval's metrics.json records it for the task's metric; others from the registry.

    CER and WER are error rates: a drop is the improvement and the worst examples are the highest.
    Names the registry does not know (a plugin's metric in a process without the plugin) count as higher-better.
    """
    if key == metrics.get("metric") and isinstance(metrics.get("higher_is_better"), bool):
        return metrics["higher_is_better"]
    from florence_kit.metrics import get_metric

    try:
        return get_metric(key).higher_is_better
    except KeyError:
        return True


def _score_class(score: Any, higher_better: bool = True) -> str:
    if not isinstance(score, (int, float)):
        return ""
    if not higher_better:  # an error rate per example: 0 is perfect
        return "score-good" if score <= 0 else "score-mid" if score < 0.5 else "score-bad"
    return "score-bad" if score < 0.5 else "score-mid" if score < 1 else "score-good"


def _thumbnail(run: EvalRun, rec: dict[str, Any]) -> str:
    rel = rec.get("thumbnail")
    path = (run.path / rel) if isinstance(rel, str) else None
    if path is None or not path.is_file() or run.path.resolve() not in path.resolve().parents:
        return '<span class="meta">no thumbnail</span>'
    from florence_kit.present.draw import overlay_thumbnail  # region tasks: true (green) and predicted (red) boxes

    jpeg = path.read_bytes()
    data = base64.b64encode(overlay_thumbnail(jpeg, rec) or jpeg).decode()
    return f'<img src="data:image/jpeg;base64,{data}" alt="page {_e(rec.get("id", ""))}">'


def _summary_table(inputs: ReportInputs) -> str:
    pair = inputs.before_after()
    names: list[str] = []
    for run in inputs.evals:
        main = run.metrics.get("metric")
        for key in ([main] if main else []) + [k for k, v in run.metrics.items() if isinstance(v, float)]:
            if key not in names:
                names.append(key)
    for key in ("n", "n_scored"):
        if any(key in r.metrics for r in inputs.evals):
            names.append(key)
    head = "".join(f"<th>{_e(r.label)}</th>" for r in inputs.evals) + ("<th>change</th>" if pair else "")
    rows = []
    for key in names:
        cells = "".join(f'<td class="num">{_e(_fmt(r.metrics.get(key)))}</td>' for r in inputs.evals)
        if pair:
            before, after = pair[0].metrics.get(key), pair[1].metrics.get(key)
            if isinstance(before, float) and isinstance(after, float):
                delta = after - before
                gain = delta if higher_is_better(pair[1].metrics, key) else -delta
                cls = "better" if gain > 0 else "worse" if gain < 0 else ""
                cells += f'<td class="num {cls}">{delta:+.4f}</td>'
            else:
                cells += "<td></td>"
        rows.append(f"<tr><th>{_e(key)}</th>{cells}</tr>")
    return f'<table id="summary"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def _sort_key(rec: dict[str, Any], higher_better: bool = True) -> tuple[int, float]:
    """Worst first: the lowest scores, or the highest error rates; unscored rows last."""
    score = rec.get("score")
    if not isinstance(score, (int, float)):
        return (1, 0.0)
    return (0, float(score) if higher_better else -float(score))


def _examples_table(
    run: EvalRun, pair: tuple[EvalRun, EvalRun] | None, max_examples: int, table_id: str = "examples"
) -> tuple[str, int, int]:
    """The worst ``max_examples`` rows of ``run`` (beside its 'before' run); returns (html, shown, total)."""
    before_by_id = {}
    if pair:
        before_by_id = {str(r.get("id", i)): r for i, r in enumerate(pair[0].records)}
    up = higher_is_better(run.metrics, str(run.metrics.get("metric", "")))
    records = sorted(enumerate(run.records), key=lambda ir: _sort_key(ir[1], up))[:max_examples]
    head = ['<th class="sortable">#</th>', "<th>image</th>", '<th class="sortable">question</th>',
            '<th class="sortable">prediction</th>', "<th>references</th>",
            f'<th class="sortable" data-dir="{"asc" if up else "desc"}">score</th>']
    if pair:
        head += ['<th class="sortable">prediction before</th>', '<th class="sortable">score before</th>']
    rows = []
    for index, rec in records:
        score = rec.get("score")
        score_sort = f"{score:.6f}" if isinstance(score, (int, float)) else ""
        refs = "<br>".join(_e(r) for r in rec.get("references") or [])
        question = _question(str(rec.get("prompt", "")))
        cells = [
            f'<td class="num" data-sort="{index}">{_e(rec.get("id", index))}</td>',
            f"<td>{_thumbnail(run, rec)}</td>",
            f'<td data-sort="{_e(question)}">{_e(question)}</td>',
            f'<td data-sort="{_e(rec.get("prediction", ""))}">{_e(rec.get("prediction", ""))}</td>',
            f"<td>{refs}</td>",
            f'<td class="num {_score_class(score, up)}" data-sort="{score_sort}">{_e(_fmt(score))}</td>',
        ]
        if pair:
            old = before_by_id.get(str(rec.get("id", index)), {})
            old_score = old.get("score")
            old_sort = f"{old_score:.6f}" if isinstance(old_score, (int, float)) else ""
            cells += [
                f'<td data-sort="{_e(old.get("prediction", ""))}">{_e(old.get("prediction", "–"))}</td>',
                f'<td class="num {_score_class(old_score, up)}" data-sort="{old_sort}">{_e(_fmt(old_score))}</td>',
            ]
        rows.append(f'<tr class="example">{"".join(cells)}</tr>')
    table = (f'<table id="{table_id}" class="examples"><thead><tr>{"".join(head)}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')
    return table, len(records), len(run.records)


CONFIG_KEYS = ("task", "model", "dataset", "mode", "max_steps", "epochs", "batch_size", "grad_accum", "lr",
               "schedule", "warmup_steps", "seed")


def render_html(inputs: ReportInputs, max_examples: int = DEFAULT_MAX_EXAMPLES) -> str:
    title = f"florence-kit report: {inputs.source.resolve().name}"
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="meta">from <code>{_e(inputs.source)}</code>, generated '
             f'{datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</p>']
    if inputs.evals:
        task = next((r.metrics.get("task") for r in inputs.evals if r.metrics.get("task")), "")
        heading = "Before / after fine-tuning" if inputs.before_after() else "Metrics"
        if inputs.several_tasks():
            task, heading = "", f"Metrics of {len(inputs.evals)} tasks"
        parts += [f"<h2>{heading}{' — ' + _e(task) if task else ''}</h2>", _summary_table(inputs)]
        parts.append('<p class="meta">' + ", ".join(
            f"{_e(r.label)}: <code>{_e(r.path)}</code>" for r in inputs.evals) + "</p>")
    if inputs.train_dir is not None:
        parts.append("<h2>Training</h2>")
        shown = {k: inputs.config[k] for k in CONFIG_KEYS if inputs.config.get(k) is not None}
        if shown:
            parts.append('<table id="config">' + "".join(
                f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in shown.items()) + "</table>")
        plots = training_plots(inputs.train_log)
        if plots:
            parts.append('<div class="plots">' + "".join(
                f'<img class="plot" src="{uri}" alt="{_e(name)}" title="{_e(name)}">' for name, uri in plots.items()
            ) + "</div>")
        else:
            parts.append('<p class="meta">metrics.jsonl has no logged steps yet.</p>')
    listed = inputs.evals if inputs.several_tasks() else [run for run in [inputs.primary()] if run]
    for number, run in enumerate(listed):
        pair = None if inputs.several_tasks() else inputs.before_after()
        table, shown_n, total = _examples_table(run, pair, max_examples, "examples" + (f"-{number}" if number else ""))
        up = higher_is_better(run.metrics, str(run.metrics.get("metric", "")))
        worst = "lowest" if up else "highest"
        note = f"the {shown_n} {worst}-scoring of {total}" if shown_n < total else f"all {total}"
        parts += [f"<h2>Examples ({_e(run.label)})</h2>",
                  f'<p class="meta">{note}, worst first; click a column header to sort.</p>', table]
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{STYLE}</style></head>\n'
        f"<body>\n{body}\n<script>{SORT_JS}</script>\n</body></html>\n"
    )


def write_report(source: Path, output: Path | None = None, max_examples: int = DEFAULT_MAX_EXAMPLES) -> Path:
    """Read ``source``, write ``report.html`` (into ``source`` unless ``output`` says otherwise)."""
    if max_examples < 1:
        raise UserError(f"--max-examples must be at least 1, got {max_examples}")
    inputs = find_inputs(source)
    page = render_html(inputs, max_examples)
    out = output or source
    if out.suffix.lower() not in {".html", ".htm"}:  # a folder (existing or not) gets report.html inside
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
