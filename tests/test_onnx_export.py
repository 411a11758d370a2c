"""``export --onnx``: the graphs answer as the PyTorch model does, in onnxruntime and in Transformers.js.

One export of the tiny model (fp32 + int8, ~40 s on two cores) serves every test here. The Transformers.js test
installs ``@huggingface/transformers`` v4 with ``npm install --ignore-scripts`` into a cache folder and skips with
a one-line reason where Node, npm or the registry is missing; its answers are also recorded in
``tests/fixtures/transformersjs_tiny.json``, checked against PyTorch without Node.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.errors import UserError

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")

runner = CliRunner()
FIXTURE = Path(__file__).parent / "fixtures" / "transformersjs_tiny.json"
NODE_SCRIPT = Path(__file__).parent / "fixtures" / "transformersjs_generate.mjs"
TRANSFORMERS_JS = "@huggingface/transformers@4"
QUESTION = "What is the total?"


@pytest.fixture(scope="module")
def onnx_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from florence_kit.present.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(str(tiny_dir), out, quantize="int8", print_fn=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def models(tiny_dir: Path, onnx_dir: Path):
    from florence_kit.model.loading import load_model
    from florence_kit.model.onnx_runtime import load_onnx_model

    torch_model, processor = load_model(str(tiny_dir))
    onnx_model, _ = load_onnx_model(onnx_dir, "fp32")
    return torch_model.eval(), onnx_model, processor


def pages(n: int = 3) -> list:
    """Noise pages at the model's 128 px (the processor's resize is then the identity, in PIL and in sharp)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(n)]


def test_export_writes_the_transformersjs_layout(onnx_dir: Path) -> None:
    import onnx

    names = {p.name for p in (onnx_dir / "onnx").iterdir()}
    for graph in ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged"):
        assert {f"{graph}.onnx", f"{graph}_int8.onnx"} <= names, graph
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "processor_config.json", "florence_kit_export.json"):
        assert (onnx_dir / name).is_file(), name
    info = json.loads((onnx_dir / "florence_kit_export.json").read_text())
    assert info["variants"] == ["fp32", "int8"] and info["max_abs_logit_diff"] <= 1e-4
    pre = json.loads((onnx_dir / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Florence2Processor" and pre["task_prompts_without_inputs"]["<OD>"]
    assert pre["tasks_answer_post_processing_type"]["<OD>"] == "description_with_bboxes"
    assert json.loads((onnx_dir / "config.json").read_text())["is_encoder_decoder"] is True
    decoder = onnx.load(onnx_dir / "onnx" / "decoder_model_merged.onnx", load_external_data=False).graph
    inputs = [i.name for i in decoder.input]
    assert inputs[:3] == ["inputs_embeds", "encoder_attention_mask", "encoder_hidden_states"]
    assert inputs[-1] == "use_cache_branch" and "past_key_values.1.encoder.value" in inputs
    assert [o.name for o in decoder.output][:3] == ["logits", "present.0.decoder.key", "present.0.decoder.value"]
    assert [n.op_type for n in decoder.node] == ["If"]  # both steps in one graph, weights stored once
    sizes = info["files"]
    assert sizes["decoder_model_merged_int8.onnx"] < 0.5 * sizes["decoder_model_merged.onnx"]
    assert oct(onnx_dir.stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's private one


def test_fp32_logits_within_1e4_of_pytorch_with_and_without_cache(models) -> None:
    from florence_kit.evaluate.generation import encode, generation_config

    torch_model, onnx_model, processor = models
    prompts = ["<DocVQA>What is the total amount due?", "<CAPTION>", "<OD>"]  # different lengths: right padding
    inputs = encode(processor, pages(), prompts)
    gen = generation_config(torch_model, processor, {"max_new_tokens": 6})
    gen.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = torch_model.generate(**inputs, generation_config=gen)
        got = onnx_model.generate(**inputs, generation_config=gen)
    assert torch.equal(expected.sequences, got.sequences)
    diffs = [float((a - b).abs().max()) for a, b in zip(expected.logits, got.logits, strict=True)]
    print(f"onnxruntime vs torch logits: max |diff| {max(diffs):.3g}, "
          f"max |logit| {max(float(a.abs().max()) for a in expected.logits):.3g}")
    # step 1 without cache, steps 2-6 with it. onnxruntime's kernels sum and fuse in their own order: a few float32
    # ulps of logits below ~10 per layer; a cache entry or mask off by one position moves them by > 1e-2
    assert len(diffs) == 6 and max(diffs) < 1e-4, diffs


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("task", ["docvqa", "caption", "od"])
def test_generations_identical_to_pytorch(models, task: str, num_beams: int) -> None:
    from florence_kit.evaluate.generation import generate, generation_config_for
    from florence_kit.tasks.registry import get_task

    torch_model, onnx_model, processor = models
    spec = get_task(task)
    prompt = spec.prompt.format(question=QUESTION) if "{" in spec.prompt else spec.prompt
    gen = generation_config_for(spec, torch_model, processor, num_beams=num_beams, max_new_tokens=24)
    images = pages(2)
    expected = generate(torch_model, processor, images, [prompt] * 2, gen)
    assert generate(onnx_model, processor, images, [prompt] * 2, gen) == expected
    assert any(expected)


def test_predict_eval_accept_the_export(onnx_dir: Path, tiny_dir: Path, docvqa_dir: Path, tmp_path: Path) -> None:
    """The CLI on the folder: int8 is its default (what was asked for); eval writes the same files as PyTorch's."""
    page = tmp_path / "page.png"
    pages(1)[0].save(page)
    out = runner.invoke(app, ["predict", str(page), "--task", "docvqa", "--model", str(onnx_dir), "--question",
                              QUESTION])
    assert out.exit_code == 0, out.output
    result = runner.invoke(app, ["eval", "docvqa", "--model", str(onnx_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(tmp_path / "eval"), "--max-samples", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["anls"] is not None
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 3


def test_serve_answers_from_the_export_as_from_pytorch(models) -> None:
    """serve's Predictor (the web page's answer) on the ONNX model: the same text and the same parsed boxes."""
    from florence_kit.present.serve import Predictor
    from florence_kit.tasks.registry import all_tasks

    torch_model, onnx_model, processor = models
    tasks = dict(all_tasks())
    image = pages(1)[0]
    for choice, question in (("docvqa", QUESTION), ("od", ""), ("<OD>", "")):
        expected = Predictor(torch_model, processor, tasks)(image, choice, question)
        got = Predictor(onnx_model, processor, tasks)(image, choice, question)
        assert got.text == expected.text and (got.regions is None) == (expected.regions is None), choice


def test_answers_of_an_export_are_capped_at_its_position_table(models) -> None:
    """The ONNX runner goes through the same generation settings: its config's table caps a task's length."""
    from florence_kit.evaluate.generation import generation_config, position_limit

    torch_model, onnx_model, processor = models
    assert position_limit(onnx_model) == torch_model.config.text_config.max_position_embeddings == 1024
    assert generation_config(onnx_model, processor, {"max_new_tokens": 5000}).max_new_tokens == 1024


def test_fp16_variant_runs_and_keeps_float32_inputs(onnx_dir: Path, tmp_path: Path) -> None:
    """--quantize fp16: float16 weights, float32 inputs/outputs (Transformers.js feeds float32)."""
    import onnx

    from florence_kit.evaluate.generation import generate, generation_config
    from florence_kit.model.onnx_runtime import load_onnx_model
    from florence_kit.present.onnx_export import convert_fp16

    copy = tmp_path / "export"
    shutil.copytree(onnx_dir, copy)
    convert_fp16(copy / "onnx")
    graph = onnx.load(copy / "onnx" / "decoder_model_merged_fp16.onnx").graph
    assert {i.type.tensor_type.elem_type for i in graph.input if i.name != "use_cache_branch"} <= {
        onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    half, processor = load_onnx_model(copy, "fp16")
    full, _ = load_onnx_model(copy, "fp32")
    gen = generation_config(full, processor, {"max_new_tokens": 8})
    assert generate(half, processor, pages(2), ["<OD>"] * 2, gen) == generate(full, processor, pages(2), ["<OD>"] * 2,
                                                                             gen)


def test_load_model_runs_an_export_in_onnxruntime(onnx_dir: Path) -> None:
    from florence_kit.model.loading import load_model

    model, processor = load_model(str(onnx_dir))
    assert model.variant == "int8" and model.sessions["decoder_model_merged"].get_providers()
    assert processor.image_processor.size["height"] == 128


def test_export_of_a_run_carries_its_task_files(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A run trained on a task of its own: the export copies its task folder, and predict finds the task there."""
    import yaml

    from florence_kit.model.onnx_runtime import export_tasks_dirs
    from florence_kit.present import onnx_export
    from florence_kit.tasks.registry import get_task

    run, tasks = tmp_path / "run", tmp_path / "mytasks"
    shutil.copytree(tiny_dir, run)
    tasks.mkdir()
    (tasks / "invoice.yaml").write_text('task: invoice\nprompt: "<INVOICE>{question}"\ntarget: "{answer}"\n'
                                        "references: answer\nmetric: anls\ndataset: {path: ./data}\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "invoice", "tasks_dirs": [str(tasks)]}))
    monkeypatch.setattr(onnx_export, "export_graphs", lambda *a, **k: None)  # the graphs are tested above
    monkeypatch.setattr(onnx_export, "check_logits", lambda *a, **k: 0.0)
    info = onnx_export.export_onnx(str(run), tmp_path / "out", print_fn=lambda *_: None)
    assert info["task"] == "invoice" and info["tasks_dirs"] == ["tasks/0-mytasks"]
    shutil.rmtree(tasks)  # the export no longer needs the run's folder
    assert get_task("invoice", export_tasks_dirs(str(tmp_path / "out"))).prompt == "<INVOICE>{question}"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no half-written OUT


def _cli_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_export_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    line = _cli_error(["export", str(tmp_path / "notes"), "--onnx", str(tmp_path / "out")])
    assert "not a Florence-2 checkpoint" in line and not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_out(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    line = _cli_error(["export", str(tiny_dir), "--onnx", str(tmp_path / "out")])
    assert "not empty" in line and [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_export_names_the_extra_when_onnx_is_missing(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnxscript(name: str, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    line = _cli_error(["export", str(tiny_dir), "--onnx", str(tmp_path / "out")])
    assert "onnxscript" in line and "florence-kit[onnx]" in line and not (tmp_path / "out").exists()


def test_export_options_are_checked(tiny_dir: Path, tmp_path: Path) -> None:
    assert "--quantize" in _cli_error(["export", str(tiny_dir), "--onnx", str(tmp_path / "o"), "--quantize", "q4"])
    assert "--opset" in _cli_error(["export", str(tiny_dir), "--onnx", str(tmp_path / "o"), "--opset", "11"])
    assert "--merge or --onnx" in _cli_error(["export", str(tiny_dir)])
    assert not (tmp_path / "o").exists()


def test_failed_export_leaves_no_out(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from florence_kit.present import onnx_export

    def fail(*args, **kwargs):
        raise UserError("torch.onnx could not export decoder_model (boom)")

    monkeypatch.setattr(onnx_export, "export_graphs", fail)
    line = _cli_error(["export", str(tiny_dir), "--onnx", str(tmp_path / "out")])
    assert "boom" in line and list(tmp_path.iterdir()) == []  # neither OUT nor the temporary folder


def test_int8_of_a_model_that_does_not_quantise_is_refused(onnx_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import onnxruntime.quantization

    from florence_kit.present.onnx_export import quantize_int8

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_dir / "onnx", folder)
    for int8 in folder.glob("*_int8.onnx"):
        int8.unlink()
    # a model whose weights are not float (already quantised) comes out of quantize_dynamic unchanged
    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", lambda src, dst, **kw: shutil.copy(src, dst))
    with pytest.raises(UserError, match="no weight that quantises"):
        quantize_int8(folder)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_graph_is_one_line(onnx_dir: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "export"
    shutil.copytree(onnx_dir, copy)
    graph = copy / "onnx" / "decoder_model_merged_int8.onnx"
    if damage == "missing":
        graph.unlink()
    else:
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    page = tmp_path / "page.png"
    pages(1)[0].save(page)
    line = _cli_error(["predict", str(page), "--task", "od", "--model", str(copy)])
    assert "decoder_model_merged_int8.onnx" in line and "export the model again" in line
    assert ("missing" if damage == "missing" else "damaged or truncated") in line


# ---------------------------------------------------------------------------------------------
# Transformers.js (Node)


def pytorch_answers(tiny_dir: Path, page: Path) -> dict[str, str]:
    """florence-kit's PyTorch predict: the docvqa answer, and the <OD> answer with its <loc_*> tokens."""
    from PIL import Image

    from florence_kit.evaluate.generation import generate, generation_config_for
    from florence_kit.evaluate.region_answers import generate_raw
    from florence_kit.model.loading import load_model
    from florence_kit.tasks.registry import get_task

    model, processor = load_model(str(tiny_dir))
    image = Image.open(page).convert("RGB")
    docvqa, od = get_task("docvqa"), get_task("od")
    return {
        "docvqa": generate(model, processor, [image], [docvqa.prompt.format(question=QUESTION)],
                           generation_config_for(docvqa, model, processor))[0],
        "od": generate_raw(model, processor, image, od.prompt, generation_config_for(od, model, processor)),
    }


def transformersjs_dir() -> Path:
    """@huggingface/transformers v4 in a cache folder (installed once), or a skip naming what is missing."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Transformers.js check needs Node >= 18 and npm, not found on PATH")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"Transformers.js check needs Node >= 18, found {version}")
    cache = Path(os.environ.get("FLORENCE_KIT_NODE_CACHE", Path.home() / ".cache" / "florence-kit" / "node"))
    if not (cache / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "package.json").write_text('{"name": "florence-kit-tests", "private": true}\n')
        # --ignore-scripts: onnxruntime-node's install script downloads binaries from outside the registry
        done = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", TRANSFORMERS_JS],
                              cwd=cache, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"npm could not install {TRANSFORMERS_JS} (registry unreachable?): "
                        f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return cache


def run_transformersjs(module_dir: Path, model_dir: Path, page: Path, prompt: str, max_new_tokens: int) -> dict:
    done = subprocess.run(["node", str(NODE_SCRIPT), str(module_dir), str(model_dir), str(page), prompt,
                           str(max_new_tokens)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def js_answer(text: str) -> str:
    """Transformers.js decodes with the special tokens; florence-kit removes all but <loc_*> (decode_answers)."""
    for token in ("<s>", "</s>", "<pad>"):
        text = text.replace(token, "")
    return text.strip()


def test_transformersjs_answers_as_pytorch(onnx_dir: Path, tiny_dir: Path, tmp_path: Path) -> None:
    from florence_kit.common.geometry import ensure_parse_config
    from florence_kit.model.onnx_runtime import load_onnx_model

    module_dir = transformersjs_dir()
    model_dir = tmp_path / "fp32"  # Transformers.js reads fp32 graphs by default (dtype 'fp32')
    shutil.copytree(onnx_dir, model_dir)
    page = tmp_path / "page.png"
    pages(1)[0].save(page)
    expected = pytorch_answers(tiny_dir, page)
    docvqa = run_transformersjs(module_dir, model_dir, page, f"<DocVQA>{QUESTION}", 64)
    od = run_transformersjs(module_dir, model_dir, page, "<OD>", 256)
    assert js_answer(docvqa["text"]) == expected["docvqa"]
    assert js_answer(od["text"]) == expected["od"]
    # the boxes Transformers.js parses from it are transformers' own parse of the same text (Python truncates to
    # whole pixels, Transformers.js keeps the bin centre). The random model's answer opens with a stray <loc_*>,
    # which the two parsers attach differently, so one box may differ; every other box must be the same.
    _, processor = load_onnx_model(model_dir, "fp32")
    ensure_parse_config(processor)  # the tiny processor has no post-processing config of its own
    ours = processor.post_process_generation(expected["od"], task="<OD>", image_size=(128, 128))["<OD>"]
    theirs = od["parsed"]["<OD>"]
    assert len(theirs["bboxes"]) == len(ours["bboxes"]) > 5
    python_boxes = {tuple(int(v) for v in box) for box in ours["bboxes"]}
    same = sum(tuple(int(np.floor(v)) for v in box) in python_boxes for box in theirs["bboxes"])
    assert same >= len(theirs["bboxes"]) - 1, (theirs["bboxes"], ours["bboxes"])
    recorded = {"docvqa": docvqa, "od": od}
    if os.environ.get("FLORENCE_KIT_RECORD_FIXTURES"):
        FIXTURE.write_text(json.dumps(recorded, indent=1) + "\n")


def test_recorded_transformersjs_answers_match_pytorch(tiny_dir: Path, tmp_path: Path) -> None:
    """Without Node: the answers Transformers.js gave (recorded by the test above) are still PyTorch's."""
    recorded = json.loads(FIXTURE.read_text())
    page = tmp_path / "page.png"
    pages(1)[0].save(page)
    expected = pytorch_answers(tiny_dir, page)
    assert js_answer(recorded["docvqa"]["text"]) == expected["docvqa"]
    assert js_answer(recorded["od"]["text"]) == expected["od"]


def test_export_friendly_forwards_compute_what_transformers_computes() -> None:
    """The export-time channel attention (several groups) and GELU equal transformers' own, and are put back."""
    from transformers import Florence2VisionConfig
    from transformers.activations import ACT2FN
    from transformers.models.florence2.modeling_florence2 import Florence2VisionChannelAttention

    from florence_kit.present.onnx_friendly import export_friendly

    torch.manual_seed(0)
    attention = Florence2VisionChannelAttention(Florence2VisionConfig(embed_dim=[64] * 4, num_groups=[4] * 4), 0)
    holder = torch.nn.Sequential(attention, ACT2FN["gelu"]).eval()
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        before = holder(x)
        with export_friendly(holder):
            assert "forward" in vars(attention)
            during = holder(x)
        after = holder(x)
    # the export's form computes the same products in another association: float32 ulps of values below ~5
    assert torch.allclose(during, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, before) and "forward" not in vars(attention)


def test_exported_vision_tower_runs_fused_kernels(onnx_dir: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """After onnxruntime's load-time optimisation the GELUs are one (Bias)Gelu kernel (no Erf left) and the channel
    attention's products are FusedMatMul with a transposed operand, not a transpose of the feature map."""
    import onnx
    import onnxruntime as ort
    from transformers import Florence2Config

    blocks = sum(Florence2Config.from_pretrained(tiny_dir).vision_config.depths)  # a spatial + a channel block each
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3  # not the warning that the saved graph is tuned to this CPU
    ort.InferenceSession(str(onnx_dir / "onnx" / "vision_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(tmp_path / "optimised.onnx").graph.node
    ops = [node.op_type for node in nodes]
    assert "Erf" not in ops and ops.count("Gelu") + ops.count("BiasGelu") == 2 * blocks
    transposed = [n for n in nodes if n.op_type == "FusedMatMul"
                  and any(a.name in ("transA", "transB") and a.i for a in n.attribute)]
    assert len(transposed) >= blocks  # v attn^T in each channel block (q^T k too, unless the transposes merge)
    perms = [tuple(a.ints) for n in nodes if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
    assert (0, 2, 3, 4, 1) not in perms  # transformers' [batch, tokens, 1, groups, head_dim] -> tokens last


def test_an_export_stays_in_onnxruntime_and_refuses_a_torch_attention(onnx_dir: Path, monkeypatch) -> None:
    """eval/predict/serve on an export: no move to a GPU (its one torch parameter is generate()'s anchor), and
    --attn other than auto/sdpa is one line (the graphs hold their attention)."""
    from florence_kit.model.loading import load_for_generation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model, _ = load_for_generation(str(onnx_dir), "auto")
    assert model.runs_onnx and next(model.parameters()).device.type == "cpu"
    with pytest.raises(UserError, match="applies to PyTorch models"):
        load_for_generation(str(onnx_dir), "eager")


def test_later_decoder_steps_return_empty_cross_attention_placeholders(onnx_dir: Path) -> None:
    """As optimum writes merged decoders: a later step does not copy the cross-attention cache out again; its
    present.*.encoder.* are empty (Transformers.js and florence-kit keep the first step's)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "onnx" / "decoder_model_merged.onnx"),
                                   providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else (3 if "encoder" in str(d) else 2 if "past" in str(d) else 1)
                 for d in spec.shape]
        if spec.name == "use_cache_branch":
            feeds[spec.name] = np.array([True])
        elif "int64" in spec.type:
            feeds[spec.name] = np.ones(shape, dtype=np.int64)
        else:
            feeds[spec.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    named = dict(zip(names, session.run(None, feeds), strict=True))
    encoder_presents = [n for n in names if ".encoder." in n]
    assert encoder_presents and all(named[n].size == 0 for n in encoder_presents)
    assert all(named[n].shape[2] == 3 for n in names if ".decoder." in n)  # past 2 + this step


def test_int8_vision_convolutions_run_as_int8_and_answer_as_fp32(onnx_dir: Path, tmp_path: Path) -> None:
    """The int8 vision graph quantises its convolutions too (QDQ, ranges from calibration pages) and onnxruntime runs
    them as QLinearConv; its features stay within 5 % (RMS) of fp32's, and the int8 export answers as the fp32 one
    on most pages. (The tiny random model's logits sit close together, so a few late tokens flip: 7 of 12 pages
    equal, 8 of 12 with the MatMuls alone quantised; the benchmark holds the trained demo model to ANLS.)"""
    import onnx
    import onnxruntime as ort
    from transformers import AutoProcessor

    from florence_kit.evaluate.generation import generate, generation_config
    from florence_kit.model.onnx_runtime import load_onnx_model

    graph = onnx.load(onnx_dir / "onnx" / "vision_encoder_int8.onnx").graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producers.get(n.input[0]) == producers.get(n.input[1]) == "DequantizeLinear" for n in convs)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    int8 = ort.InferenceSession(str(onnx_dir / "onnx" / "vision_encoder_int8.onnx"), options,
                                providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimised.onnx").graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") + ops.count("NhwcQLinearConv") == len(convs)
    assert json.loads((onnx_dir / "florence_kit_export.json").read_text())["int8_calibration"]

    pixels = AutoProcessor.from_pretrained(onnx_dir).image_processor(images=pages(12), return_tensors="np")
    feeds = {"pixel_values": pixels["pixel_values"]}
    fp32 = ort.InferenceSession(str(onnx_dir / "onnx" / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    expected, got = fp32.run(None, feeds)[0], int8.run(None, feeds)[0]
    assert np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean()) < 0.05

    answers = {}
    for variant in ("fp32", "int8"):
        model, processor = load_onnx_model(onnx_dir, variant)
        gen = generation_config(model, processor, {"max_new_tokens": 12})
        answers[variant] = generate(model, processor, pages(12), [f"<DocVQA>{QUESTION}"] * 12, gen)
    assert sum(a == b for a, b in zip(answers["int8"], answers["fp32"], strict=True)) >= 6


def test_vision_tower_has_no_layout_transposes_beside_its_convolutions(onnx_dir: Path, tmp_path: Path) -> None:
    """DaViT is exported channels-last: after onnxruntime's optimisation no Transpose feeds or follows a
    convolution's layout reorder (transformers' channels-first form leaves two full-map transposes per block)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(onnx_dir / "onnx" / "vision_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(tmp_path / "optimised.onnx").graph.node
    kinds = {out: node.op_type for node in nodes for out in node.output}
    reorders = [n for n in nodes if n.op_type in ("ReorderInput", "ReorderOutput")]
    assert reorders
    beside = [n for n in nodes if n.op_type == "Transpose" and (
        kinds.get(n.input[0]) == "ReorderOutput" or any(n.output[0] in r.input for r in reorders))]
    assert not beside
