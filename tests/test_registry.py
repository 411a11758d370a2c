"""Tasks as files: built-ins, extra folders, the environment variable, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.errors import UserError
from florence_kit.tasks.registry import BUILTIN_DIR, all_tasks, get_task, task_files
from florence_kit.tasks.spec import load_task_specs

runner = CliRunner()

GOOD_TASK = """
task: my_docs
dataset: {path: ./data}
prompt: "<DocVQA>{question}"
target: "{answers[0]}"
references: answers
metric: anls
"""


@pytest.mark.parametrize("path", task_files(BUILTIN_DIR), ids=lambda p: p.name)
def test_every_shipped_task_file_loads(path: Path) -> None:
    for spec in load_task_specs(path):
        assert spec.name and spec.prompt and spec.metric


def test_docvqa_spec_matches_the_public_dataset() -> None:
    spec = get_task("docvqa")
    assert spec.dataset.path == "HuggingFaceM4/DocumentVQA"
    assert spec.prompt == "<DocVQA>{question}"
    assert spec.references == "answers" and spec.metric == "anls"
    assert (spec.dataset.train_split, spec.dataset.eval_split) == ("train", "validation")


def test_tasks_list_shows_docvqa() -> None:
    result = runner.invoke(app, ["tasks", "list"])
    assert result.exit_code == 0, result.output
    assert "docvqa" in result.stdout and "anls" in result.stdout


def test_unknown_task_suggests_the_closest(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tasks", "show", "docvq"])
    assert result.exit_code == 2
    assert "did you mean docvqa" in result.output


def test_tasks_dir_and_env_var_add_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.yaml").write_text(GOOD_TASK)
    assert "my_docs" in all_tasks([tmp_path])
    result = runner.invoke(app, ["tasks", "list", "--tasks-dir", str(tmp_path)])
    assert "my_docs" in result.stdout
    monkeypatch.setenv("FLORENCE_KIT_TASKS_PATH", str(tmp_path))
    assert get_task("my_docs").origin == str(tmp_path / "mine.yaml")


def test_include_merges_base_fields(tmp_path: Path) -> None:
    (tmp_path / "_base.yaml").write_text("metric: anls\ndataset: {path: a/b, eval_split: val}\nreferences: answers\n")
    (tmp_path / "t.yaml").write_text(
        "include: _base.yaml\ntask: t\nprompt: 'x{question}'\ntarget: '{answers[0]}'\ndataset: {path: c/d}\n"
    )
    spec = get_task("t", [tmp_path])
    assert spec.dataset.path == "c/d" and spec.dataset.eval_split == "val"  # nested keys merged
    assert "_base" not in all_tasks([tmp_path])


def test_duplicate_names_name_both_origins(tmp_path: Path) -> None:
    (tmp_path / "docvqa.yaml").write_text(GOOD_TASK.replace("my_docs", "docvqa"))
    with pytest.raises(UserError) as err:
        all_tasks([tmp_path])
    assert str(tmp_path / "docvqa.yaml") in str(err.value) and "docvqa.yaml" in str(err.value).split(" and ")[0]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("task: [unclosed\n", "not valid YAML"),
        (GOOD_TASK.replace("metric: anls", "metric: blue"), "unknown metric 'blue'"),
        (GOOD_TASK.replace('prompt: "<DocVQA>{question}"', ""), "missing required field 'prompt'"),
        (GOOD_TASK + "promt: x\n", "unknown key"),
        (GOOD_TASK.replace("{question}", "{question"), "is not a template"),  # a stray brace was a traceback
        (GOOD_TASK.replace("{question}", "{question} as JSON {\\\"a\\\": 1}"), "names no column; write a literal"),
    ],
)
def test_broken_task_file_exits_2_naming_file_and_problem(tmp_path: Path, content: str, problem: str) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(content)
    result = runner.invoke(app, ["tasks", "list", "--tasks-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "broken.yaml" in result.output and problem in result.output
    assert "Traceback" not in result.output


def test_tasks_show_renders_one_example(docvqa_dir: Path, docvqa_splits) -> None:
    result = runner.invoke(app, ["tasks", "show", "docvqa", "--dataset", str(docvqa_dir)])
    assert result.exit_code == 0, result.output
    row = docvqa_splits["train"][0]
    assert f"<DocVQA>{row['question']}" in result.stdout and repr(row["answers"][0]) in result.stdout
    assert "HuggingFaceM4/DocumentVQA" in result.stdout


def test_one_folder_reached_twice_is_not_a_duplicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tasks-dir X with X also in FLORENCE_KIT_TASKS_PATH (or a built-in folder) used to stop every command."""
    (tmp_path / "mine.yaml").write_text(GOOD_TASK)
    monkeypatch.setenv("FLORENCE_KIT_TASKS_PATH", str(tmp_path))
    assert get_task("my_docs", [tmp_path]).origin == str(tmp_path / "mine.yaml")
    assert "docvqa" in all_tasks([BUILTIN_DIR / "docvqa", tmp_path / "."])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.yaml").write_text(GOOD_TASK)  # a real second file with the name: still an error
    with pytest.raises(UserError, match="'my_docs' is defined twice"):
        all_tasks([tmp_path / "other"])


def test_a_prompt_field_of_the_wrong_type_names_the_row(tmp_path: Path) -> None:
    """'{n[0]}' on an integer column raised a bare TypeError out of the data loader."""
    import datasets
    from PIL import Image

    from florence_kit.data.dataset import TaskDataset

    (tmp_path / "t.yaml").write_text(GOOD_TASK.replace("{question}", "{question[0]}"))
    rows = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "question": [7], "answers": [["a"]]})
    with pytest.raises(UserError, match="row 0: prompt template .* cannot be filled"):
        TaskDataset(rows, get_task("my_docs", [tmp_path]), with_target=True)[0]


def test_tasks_list_piped_is_one_line_per_task(tmp_path: Path) -> None:
    """Piped, rich folded sources and origins into 80-column pieces: `| grep the_cauldron` found nothing."""
    (tmp_path / "mine.yaml").write_text(GOOD_TASK)
    result = runner.invoke(app, ["tasks", "list", "--tasks-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["name", "source", "metric", "prompt", "origin"]
    assert f"my_docs\t./data\tanls\t<DocVQA>{{question}}\t{tmp_path / 'mine.yaml'}" in lines
    assert "cauldron/diagram_image_to_text\tHuggingFaceM4/the_cauldron (diagram_image_to_text)\tcider" in result.stdout
