"""``florence-kit export RUN_OR_MODEL --onnx OUT``: ONNX graphs that onnxruntime and Transformers.js load.

The folder holds what Transformers.js (v4) reads for ``Florence2ForConditionalGeneration`` (an image-text-to-text
model there) and what :mod:`florence_kit.model.onnx_runtime` runs::

    OUT/onnx/vision_encoder.onnx        pixel_values -> image_features
    OUT/onnx/embed_tokens.onnx          input_ids -> inputs_embeds
    OUT/onnx/encoder_model.onnx         inputs_embeds, attention_mask -> last_hidden_state
    OUT/onnx/decoder_model_merged.onnx  one decoder step with the key/value cache (If on use_cache_branch)
    OUT/onnx/*_int8.onnx | *_fp16.onnx  with --quantize (Transformers.js: dtype 'int8' | 'fp16')
    OUT/config.json, generation_config.json, tokenizer.json, tokenizer_config.json, processor_config.json,
    OUT/preprocessor_config.json        the image processor + Florence2Processor's task tables (for Transformers.js)
    OUT/florence_kit_export.json        variants, opset, the logits check, the run's task (and its task files in tasks/)

Graphs come from ``torch.onnx.export`` (the dynamo exporter). The merged decoder is the layout optimum made
standard: the first step (no cache: computes the cross-attention keys/values) and later steps (cache given) are
exported separately and joined under one ``If`` node, their shared weights stored once. int8 is onnxruntime's
``quantize_dynamic`` (MatMul/Gemm/Gather weights, signed 8-bit: Transformers.js' ``int8`` files), and in the vision
tower its convolutions too, as QuantizeLinear/DequantizeLinear pairs with activation ranges measured on a few of
the run's own training pages (synthetic pages where the source has no readable dataset); fp16 is
onnxruntime's float16 converter with float32 inputs and outputs, which is what Transformers.js feeds.
Everything is written to a temporary folder beside OUT and moved in at the end: a failed export leaves no OUT.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from florence_kit.common.errors import UserError, first_line
from florence_kit.model.onnx_runtime import EXPORT_INFO, GRAPHS, SUFFIXES, load_onnx_model
from florence_kit.present.onnx_friendly import export_friendly
from florence_kit.train.runfolder import RunFolder

QUANTIZE_CHOICES = ("none", "int8", "fp16")
DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization is a single op from 17 on; older opsets are not worth supporting
LOGITS_TOLERANCE = 1e-4


def require_onnx() -> None:
    """onnx, onnxscript (the exporter's translator) and onnxruntime, or one line naming the extra."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'florence-kit[onnx]'")


# ---------------------------------------------------------------------------------------------
# The four graphs, as small modules around the transformers model


class VisionEncoder(nn.Module):
    """DaViT + the projector: one row of features per image token."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_image_features(pixel_values).pooler_output


class EmbedTokens(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class Encoder(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.encoder = model.model.language_model.encoder

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state


class DecoderStep(nn.Module):
    """The decoder + lm_head with transformers' own cache. ``with_past``: later steps (cache in, self-attention
    cache out); otherwise the first step, which also returns the cross-attention keys/values it computed."""

    def __init__(self, model: Any, with_past: bool) -> None:
        super().__init__()
        self.decoder = model.model.language_model.decoder
        self.lm_head = model.lm_head
        self.with_past = with_past

    def forward(self, inputs_embeds: torch.Tensor, encoder_attention_mask: torch.Tensor,
                encoder_hidden_states: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache, EncoderDecoderCache

        if self.with_past:
            cache = EncoderDecoderCache([tuple(past[i : i + 4]) for i in range(0, len(past), 4)])
        else:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.decoder(inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                           encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=True)
        presents: list[torch.Tensor] = []
        for i in range(len(self.decoder.layers)):
            own = cache.self_attention_cache.layers[i]
            presents += [own.keys, own.values]
            if not self.with_past:
                cross = cache.cross_attention_cache.layers[i]
                presents += [cross.keys, cross.values]
        return (self.lm_head(out.last_hidden_state), *presents)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter's progress lines and warnings, and onnxruntime.quantization's advice, kept off the terminal."""
    loggers = [logging.getLogger(name) for name in ("", "torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _cache_names(prefix: str, layers: int, kinds: tuple[str, ...] = ("decoder", "encoder")) -> list[str]:
    return [f"{prefix}.{i}.{kind}.{part}" for i in range(layers) for kind in kinds for part in ("key", "value")]


def export_graphs(model: Any, image_size: tuple[int, int], folder: Path, opset: int) -> None:
    """Write the four fp32 graphs of Transformers.js' layout into ``folder`` (dynamic batch and sequence axes)."""
    import onnx

    text = model.config.text_config
    d_model, heads, layers = text.d_model, text.decoder_attention_heads, text.decoder_layers
    head_dim = d_model // heads
    dim = torch.export.Dim
    batch, enc_len = dim("batch_size", min=1, max=4096), dim("encoder_sequence_length", min=1, max=65536)
    dec_len, past_len = dim("decoder_sequence_length", min=1, max=65536), dim("past_decoder_sequence_length",
                                                                               min=1, max=65536)
    b, s, t, p = 2, 9, 3, 5  # distinct sizes, so the exporter cannot mistake one axis for another
    height, width = image_size

    def export(module: nn.Module, args: tuple, name: str, inputs: list[str], outputs: list[str], shapes: Any) -> None:
        try:
            with quiet():
                torch.onnx.export(module, args, folder / f"{name}.onnx", input_names=inputs, output_names=outputs,
                                  dynamic_shapes=shapes, opset_version=opset, external_data=False, verbose=False)
        except Exception as exc:  # the exporter raises many types; the message names the failing step
            raise UserError(f"torch.onnx could not export {name} ({type(exc).__name__}: {first_line(exc)}); "
                            "try another --opset, or report it with the model's config.json") from None

    with torch.no_grad(), export_friendly(model):
        export(VisionEncoder(model), (torch.randn(b, 3, height, width),), "vision_encoder",
               ["pixel_values"], ["image_features"], ({0: batch},))
        export(EmbedTokens(model), (torch.randint(3, 100, (b, s)),), "embed_tokens", ["input_ids"], ["inputs_embeds"],
               ({0: batch, 1: enc_len},))
        export(Encoder(model), (torch.randn(b, s, d_model), torch.ones(b, s, dtype=torch.int64)), "encoder_model",
               ["inputs_embeds", "attention_mask"], ["last_hidden_state"], ({0: batch, 1: enc_len},) * 2)
        first = (torch.randn(b, t, d_model), torch.ones(b, s, dtype=torch.int64), torch.randn(b, s, d_model))
        step_inputs = ["inputs_embeds", "encoder_attention_mask", "encoder_hidden_states"]
        export(DecoderStep(model, with_past=False), first, "decoder_model", step_inputs,
               ["logits", *_cache_names("present", layers)],
               ({0: batch, 1: dec_len}, {0: batch, 1: enc_len}, {0: batch, 1: enc_len}))
        past, past_shapes = [], []
        for _ in range(layers):
            past += [torch.randn(b, heads, p, head_dim) for _ in range(2)]
            past += [torch.randn(b, heads, s, head_dim) for _ in range(2)]
            past_shapes += [{0: batch, 2: past_len}] * 2 + [{0: batch, 2: enc_len}] * 2
        export(DecoderStep(model, with_past=True), (torch.randn(b, 1, d_model), *first[1:], *past),
               "decoder_with_past_model", [*step_inputs, *_cache_names("past_key_values", layers)],
               ["logits", *_cache_names("present", layers, ("decoder",))],
               ({0: batch}, {0: batch, 1: enc_len}, {0: batch, 1: enc_len}, tuple(past_shapes)))
    first_step, later_steps = folder / "decoder_model.onnx", folder / "decoder_with_past_model.onnx"
    merged = merge_decoders(onnx.load(first_step), onnx.load(later_steps))
    onnx.save(merged, folder / "decoder_model_merged.onnx")
    first_step.unlink()
    later_steps.unlink()


def merge_decoders(first: Any, later: Any) -> Any:
    """One graph with an ``If`` on ``use_cache_branch``: ``later`` (then) or ``first`` (else); as optimum's merge.

    Both branches read their weights from the outer graph, where identical tensors are stored once. Both have the
    same outputs: the later-step branch's ``present.*.encoder.*`` are empty placeholders (the cache is the first
    step's, kept by the caller).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shared: dict[tuple, TensorProto] = {}
    outer_names = {i.name for i in first.graph.input} | {i.name for i in later.graph.input}

    def branch(graph: Any, tag: str, placeholders: list[str]) -> tuple[list, list]:
        rename = {i.name: i.name for i in graph.input}
        for init in graph.initializer:
            key = (init.data_type, tuple(init.dims), hashlib.sha256(numpy_helper.to_array(init).tobytes()).hexdigest())
            if key not in shared:
                kept = TensorProto()
                kept.CopyFrom(init)
                kept.name = f"shared_{len(shared)}"
                shared[key] = kept
            rename[init.name] = shared[key].name
        nodes = []
        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise UserError(f"cannot merge the decoder graphs: unexpected subgraph in a {node.op_type} node; "
                                "try another --opset")
            new = helper.make_node(node.op_type, [rename.get(n, f"{tag}/{n}") if n else "" for n in node.input],
                                   [f"{tag}/{n}" if n else "" for n in node.output],
                                   name=f"{tag}/{node.name}" if node.name else "", domain=node.domain)
            new.attribute.extend(node.attribute)
            for out in node.output:
                if out:
                    rename[out] = f"{tag}/{out}"
            nodes.append(new)
        outputs = {}
        for out in graph.output:
            outputs[out.name] = helper.make_tensor_value_info(rename[out.name], out.type.tensor_type.elem_type, None)
        for name in placeholders:
            nodes.append(helper.make_node("Constant", [], [f"{tag}/{name}"], value=numpy_helper.from_array(
                np.zeros(placeholder_shape, dtype=np.float32), f"{tag}/{name}/value")))
            outputs[name] = helper.make_tensor_value_info(f"{tag}/{name}", TensorProto.FLOAT, None)
        return nodes, outputs

    order = [o.name for o in first.graph.output]
    assert outer_names >= {i.name for i in later.graph.input}
    # later steps do not recompute the cross-attention cache: their present.*.encoder.* are empty placeholders, as
    # optimum writes them (Transformers.js and onnx_runtime.py keep the first step's; copying the cache through
    # cost a copy of every layer's keys and values per generated token)
    placeholders = [n for n in order if ".encoder." in n]
    dims = first.graph.output[order.index(placeholders[0])].type.tensor_type.shape.dim if placeholders else []
    placeholder_shape = [0, dims[1].dim_value, 0, dims[3].dim_value] if placeholders else []  # [0, heads, 0, head]
    later_nodes, later_out = branch(later.graph, "with_past", placeholders)
    first_nodes, first_out = branch(first.graph, "no_past", [])
    if_node = helper.make_node(
        "If", ["use_cache_branch"], order, name="optimum::if",
        then_branch=helper.make_graph(later_nodes, "with_past", [], [later_out[n] for n in order]),
        else_branch=helper.make_graph(first_nodes, "no_past", [], [first_out[n] for n in order]))
    first_inputs = {i.name for i in first.graph.input}
    inputs = list(first.graph.input) + [i for i in later.graph.input if i.name not in first_inputs]
    inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    outputs = []
    for out in first.graph.output:
        value = onnx.ValueInfoProto()
        value.CopyFrom(out)
        if ".decoder." in out.name:  # first step: decoder_sequence_length; later: past + 1
            value.type.tensor_type.shape.dim[2].dim_param = "present_decoder_sequence_length"
        outputs.append(value)
    graph = helper.make_graph([if_node], "decoder_model_merged", inputs, outputs, initializer=list(shared.values()))
    merged = helper.make_model(graph, opset_imports=first.opset_import, ir_version=first.ir_version)
    onnx.checker.check_model(merged)
    return merged


# ---------------------------------------------------------------------------------------------
# Variants


CALIBRATION_PAGES = 8  # pages whose activations set the vision convolutions' int8 ranges


def quantize_int8(folder: Path, calibration: list[Any] | None = None) -> None:
    """``*_int8.onnx`` beside each graph: dynamic quantisation of the MatMul/Gemm/Gather weights (signed 8-bit);
    in the vision tower the convolutions too, statically (QDQ) with ranges from ``calibration`` (pixel_values
    arrays, one page each), which onnxruntime runs as int8 convolutions in channels-last layout."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in GRAPHS:
        source, target = folder / f"{name}.onnx", folder / f"{name}{SUFFIXES['int8']}.onnx"
        staged = folder / f"{name}.qdq-conv.onnx"
        try:
            with quiet():
                if name == "vision_encoder" and calibration:
                    quantize_convolutions(source, staged, calibration)
                    source = staged
                quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=False, reduce_range=False,
                                 op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                                 extra_options={"EnableSubgraph": True})  # the merged decoder's weights sit under If
        except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
            raise UserError(f"--quantize int8 failed on {name} ({type(exc).__name__}: {first_line(exc)}); "
                            "export with --quantize none") from None
        finally:
            staged.unlink(missing_ok=True)
        ops = {n.op_type for n in _all_nodes(onnx.load(target, load_external_data=False).graph)}
        if name != "embed_tokens" and not ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}:
            raise UserError(f"--quantize int8: {name} has no weight that quantises to 8 bits "
                            f"(is the model already quantised?); export with --quantize none")


def quantize_convolutions(source: Path, target: Path, calibration: list[Any]) -> None:
    """The graph's Conv nodes as QuantizeLinear/DequantizeLinear pairs around them (QDQ): weights per output channel
    (signed), activations unsigned with the min/max seen on the calibration pages. onnxruntime fuses each pair into
    QLinearConv and runs it channels-last, so the float convolutions' layout reorders go too."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Pages(CalibrationDataReader):
        def __init__(self) -> None:
            self.pages = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            page = next(self.pages, None)
            return None if page is None else {"pixel_values": page}

    with tempfile.TemporaryDirectory(prefix="calibration-", dir=target.parent) as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)  # the calibrator writes its augmented graph into the working directory
        try:
            quantize_static(source, target, Pages(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            os.chdir(cwd)


def calibration_pages(source: str, processor: Any, count: int = CALIBRATION_PAGES) -> tuple[list[Any], str]:
    """``count`` pages of pixel_values for the int8 convolutions' ranges, and where they came from: the training
    split of the run's own dataset (config.yaml's ``dataset`` and ``task``) when it can be read, else synthetic
    document-like pages (white, grey text-like strokes, a photo-like noise patch)."""
    import numpy as np
    from PIL import Image, ImageDraw

    images: list[Any] = []
    origin = "synthetic pages"
    run = RunFolder(source)
    if run.is_run():
        try:
            from florence_kit.data.dataset import load_split, to_rgb
            from florence_kit.tasks.registry import get_task

            data = run.config()
            task = get_task(str(data["task"]), run.tasks()["tasks_dirs"])
            split = load_split(task, data.get("dataset"), task.dataset.train_split)
            if hasattr(split, "select_columns"):
                split = split.select_columns([task.image_column])  # the other columns are not decoded
            seen: set[bytes] = set()
            for row in split:
                image = row[task.image_column]
                image = image[0] if isinstance(image, list) else image
                key = hashlib.sha256(image.tobytes()).digest()  # a page's questions share its image
                if key not in seen:
                    seen.add(key)
                    images.append(to_rgb(image))
                if len(images) == count:
                    break
            origin = f"{len(images)} training pages of {data.get('dataset') or task.name}"
        except Exception:  # any unreadable run data: the synthetic pages below serve
            images = []
            origin = "synthetic pages"
    if not images:
        rng = np.random.default_rng(0)
        size = processor.image_processor.size
        width, height = size["width"], size["height"]
        for index in range(count):
            page = Image.new("RGB", (width, height), "white")
            draw = ImageDraw.Draw(page)
            for line in range(4, height - 8, max(8, height // 24)):
                shade = int(rng.integers(0, 120))
                draw.rectangle([width // 16, line, int(width * rng.uniform(0.3, 0.95)), line + max(2, height // 64)],
                               fill=(shade, shade, shade))
            if index % 2:
                patch = rng.integers(0, 256, (height // 3, width // 3, 3), dtype=np.uint8)
                page.paste(Image.fromarray(patch), (width // 2, height // 2))
            images.append(page)
    pixels = processor.image_processor(images=images, return_tensors="np")["pixel_values"]
    return [pixels[i : i + 1].astype(np.float32) for i in range(len(images))], origin


def convert_fp16(folder: Path) -> None:
    """``*_fp16.onnx``: weights and arithmetic in float16, inputs and outputs float32 (what Transformers.js feeds)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for name in GRAPHS:
        model = onnx.load(folder / f"{name}.onnx")
        try:
            half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        except Exception as exc:
            raise UserError(f"--quantize fp16 failed on {name} ({type(exc).__name__}: {first_line(exc)}); "
                            "export with --quantize none") from None
        onnx.save(half, folder / f"{name}{SUFFIXES['fp16']}.onnx")


def _all_nodes(graph: Any) -> list:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.g.node:
                nodes += _all_nodes(attr.g)
    return nodes


# ---------------------------------------------------------------------------------------------
# The files beside the graphs


def write_side_files(model: Any, processor: Any, out: Path) -> None:
    """config, generation config, tokenizer and processor files; preprocessor_config.json for Transformers.js."""
    from florence_kit.model.checkpoint_io import clean_generation_config

    clean_generation_config(model, processor)
    model.config.is_encoder_decoder = True  # Transformers.js picks its sessions and cache names by it
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    image = processor.image_processor.to_dict()
    image.pop("processor_class", None)
    image.update({
        "processor_class": "Florence2Processor",
        # Transformers.js' Florence2Processor reads the task tables from the image processor's config
        "tasks_answer_post_processing_type": processor.tasks_answer_post_processing_type,
        "task_prompts_without_inputs": processor.task_prompts_without_inputs,
        "task_prompts_with_input": processor.task_prompts_with_input,
    })
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2, default=str) + "\n")


def check_logits(model: Any, processor: Any, out: Path) -> float:
    """Max |logit difference| between PyTorch and the fp32 graphs on one image and prompt (two decoder steps)."""
    from PIL import Image

    size = processor.image_processor.size
    image = Image.new("RGB", (size["width"], size["height"]), "white")
    inputs = processor(images=[image, image], text=["<OCR>", "<CAPTION>"], return_tensors="pt", padding="longest")
    start = model.config.text_config.decoder_start_token_id
    decoder_ids = torch.tensor([[start, 5, 6]] * 2)
    onnx_model, _ = load_onnx_model(out, "fp32")
    with torch.no_grad():
        expected = model(**inputs, decoder_input_ids=decoder_ids).logits
        hidden, mask = onnx_model.encode(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        got = onnx_model(decoder_input_ids=decoder_ids, encoder_outputs=(hidden,), attention_mask=mask).logits
    return float((expected - got).abs().max())


# ---------------------------------------------------------------------------------------------
# The command


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--onnx '{out}' is a file; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--onnx '{out}' is not empty; choose a new folder (an export never writes over files)")


def load_for_export(source: str) -> tuple[Any, Any]:
    """The model in float32; a lora/qlora run merged into its (full-precision) base first."""
    from florence_kit.model.adapters import load_adapter_model
    from florence_kit.model.checkpoint_io import is_adapter_dir
    from florence_kit.model.loading import load_model
    from florence_kit.model.onnx_runtime import is_onnx_export

    path = Path(source).expanduser()
    if path.is_dir() and is_onnx_export(path):
        raise UserError(f"'{path}' is already an ONNX export; pass the run or checkpoint it was made from")
    if path.is_dir() and is_adapter_dir(path):
        model, processor = load_adapter_model(path, merge=True, dtype=torch.float32)
    else:
        model, processor = load_model(source, dtype=torch.float32)
    return model.float().eval(), processor


def run_tasks(source: Path) -> dict[str, Any]:
    """The run's task selection and its task folders (from config.yaml), so the export knows its prompts."""
    return RunFolder(source).tasks()


def export_onnx(source: str, out: Path, *, quantize: str = "none", opset: int = DEFAULT_OPSET,
                print_fn: Callable[[str], Any] = print) -> dict[str, Any]:
    """Export ``source`` (a run, checkpoint folder or hub id) to ``out``; returns what florence_kit_export.json says."""
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got '{quantize}'")
    if opset < MIN_OPSET:
        raise UserError(f"--opset must be {MIN_OPSET} or more, got {opset}")
    out = Path(out)
    check_out(out)
    require_onnx()
    model, processor = load_for_export(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.exporting-", dir=out.parent))
    try:
        (tmp / "onnx").mkdir()
        size = processor.image_processor.size
        print_fn(f"exporting {source} to ONNX (opset {opset}) ...")
        export_graphs(model, (size["height"], size["width"]), tmp / "onnx", opset)
        write_side_files(model, processor, tmp)
        variants = ["fp32"]
        calibrated = None
        if quantize == "int8":
            pixels, calibrated = calibration_pages(str(source), processor)
            quantize_int8(tmp / "onnx", pixels)
            variants.append("int8")
        elif quantize == "fp16":
            convert_fp16(tmp / "onnx")
            variants.append("fp16")
        info: dict[str, Any] = {"format": 1, "source": str(source), "variants": variants, "opset": opset}
        tasks = run_tasks(Path(source)) if Path(source).is_dir() else {}
        if tasks.get("task"):
            info["task"] = tasks["task"]
        if calibrated:
            info["int8_calibration"] = calibrated
        copied = []
        for index, folder in enumerate(tasks.get("tasks_dirs", [])):
            target = Path("tasks") / f"{index}-{folder.name}"
            shutil.copytree(folder, tmp / target, ignore=shutil.ignore_patterns("__pycache__"))
            copied.append(str(target))
        if copied:
            info["tasks_dirs"] = copied
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        diff = check_logits(model, processor, tmp)
        if not diff <= LOGITS_TOLERANCE:
            raise UserError(f"the exported graphs' logits differ from PyTorch's by {diff:.2e} (more than "
                            f"{LOGITS_TOLERANCE}); try another --opset, or report it with the model's config.json")
        info["max_abs_logit_diff"] = diff
        info["files"] = {p.name: p.stat().st_size for p in sorted((tmp / "onnx").iterdir())}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the export is an ordinary folder
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
