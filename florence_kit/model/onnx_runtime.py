"""Run an exported folder (``florence-kit export --onnx``) with onnxruntime, as a drop-in for the PyTorch model.

:class:`OnnxFlorence2` answers ``generate(input_ids=, attention_mask=, pixel_values=, generation_config=)`` like
``Florence2ForConditionalGeneration`` does, so ``predict``, ``eval`` and ``serve`` use it unchanged: the same
processor, prompts, generation settings and post-processing. The decoding itself is transformers' own
``generate()`` (greedy, beam search, stopping, cache reordering between beams); only the forward passes run in
onnxruntime, through the four graphs Transformers.js loads:

- ``vision_encoder``: ``pixel_values`` -> ``image_features``
- ``embed_tokens``: ``input_ids`` -> ``inputs_embeds``
- ``encoder_model``: ``inputs_embeds`` (image features, then the text), ``attention_mask`` -> ``last_hidden_state``
- ``decoder_model_merged``: ``inputs_embeds``, ``encoder_attention_mask``, ``encoder_hidden_states``,
  ``past_key_values.{i}.{decoder,encoder}.{key,value}``, ``use_cache_branch`` -> ``logits``, ``present.*``

Transformers.js puts the image features before the embedded text and tokenises the prompt without ``<image>``
placeholders; transformers' processor writes the placeholders into ``input_ids`` (always the first
``image_seq_length`` positions), so they are cut off here and the graphs see exactly what Transformers.js feeds.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError, first_line

GRAPHS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")
# Transformers.js' file name suffix per dtype (DEFAULT_DTYPE_SUFFIX_MAPPING in src/utils/dtypes.js)
SUFFIXES = {"fp32": "", "int8": "_int8", "fp16": "_fp16"}
EXPORT_INFO = "florence_kit_export.json"  # what florence-kit wrote: variants, opset, source, tasks


def is_onnx_export(path: Path) -> bool:
    """A folder written by ``export --onnx`` (or laid out like one: ``onnx/decoder_model_merged*.onnx``)."""
    return path.is_dir() and ((path / EXPORT_INFO).is_file() or any((path / "onnx").glob("decoder_model_merged*.onnx")))


def refuse_incomplete_export(path: Path) -> None:
    """A folder with ONNX graphs, no PyTorch weights, and neither the export's record nor its decoder graph is an
    export with files missing: say so, rather than let the PyTorch loader report missing safetensors."""
    graphs = sorted(p.name for p in (path / "onnx").glob("*.onnx")) if path.is_dir() else []
    if not graphs or is_onnx_export(path) or any(path.glob("*.safetensors")):
        return
    raise UserError(f"'{path}' holds ONNX graphs ({', '.join(graphs[:4])}) but neither {EXPORT_INFO} nor "
                    "onnx/decoder_model_merged.onnx: an incomplete ONNX export; copy the whole export folder or "
                    "export the model again (florence-kit export RUN --onnx OUT)")


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("running an ONNX export needs onnxruntime: pip install 'florence-kit[onnx]'") from None
    return onnxruntime


def export_info(path: Path) -> dict[str, Any]:
    info_file = path / EXPORT_INFO
    if not info_file.is_file():
        return {}
    try:
        return json.loads(info_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"'{info_file}' is not valid JSON ({exc}); export the model again") from None


def export_tasks_dirs(model: str | None) -> list[Path]:
    """The task folders an export copied from its run (``tasks/``), so its own tasks resolve without --tasks-dir."""
    path = Path(model).expanduser() if model else None
    if path is None or not is_onnx_export(path):
        return []
    return [path / d for d in export_info(path).get("tasks_dirs") or [] if (path / d).is_dir()]


def default_variant(path: Path) -> str:
    """The quantised variant when the export made one (that is what the user asked for), else fp32."""
    variants = export_info(path).get("variants") or ["fp32"]
    return variants[-1]


def usable_cores() -> tuple[int, int]:
    """(physical cores, logical CPUs) this process may run on: its affinity mask, capped by a cgroup CPU quota
    (a container's ``--cpus``), hyperthread siblings counted once. onnxruntime's own default counts the host's
    physical cores, which oversubscribes a container limited to fewer."""
    import math
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    logical, physical = len(cpus), max(1, len(cores))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            limit = max(1, math.ceil(int(quota) / int(period)))
            logical, physical = min(logical, limit), min(physical, limit)
    except (OSError, ValueError):
        pass
    return physical, logical


def session_threads(threads: int = 0) -> int:
    """Intra-op threads for the sessions: ``threads`` when given, else one per usable physical core (int8 and
    float kernels are bound by each core's vector units, so a hyperthread sibling adds contention, not speed)."""
    return threads if threads > 0 else usable_cores()[0]


def load_onnx_model(path: Path, variant: str | None = None, threads: int = 0) -> tuple[Any, Any]:
    """(model, processor) for an exported folder; a missing or damaged graph is a one-line error."""
    from transformers import AutoProcessor, Florence2Config

    require_onnxruntime()
    variant = variant or default_variant(path)
    if variant not in SUFFIXES:
        raise UserError(f"unknown ONNX variant '{variant}'; choose one of: {', '.join(SUFFIXES)}")
    try:
        config = Florence2Config.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"'{path}' is an incomplete ONNX export ({first_line(exc)}): export it again") from None
    return OnnxFlorence2(config, path, variant, threads=threads), processor


def _session(file: Path, options: Any) -> Any:
    import onnxruntime as ort

    if not file.is_file():
        raise UserError(f"ONNX export is missing '{file}': export the model again (florence-kit export ... --onnx)")
    try:
        return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise UserError(f"'{file}' is damaged or truncated ({first_line(exc)}): export the model again") from None


def OnnxFlorence2(config: Any, path: Path, variant: str = "fp32", threads: int = 0) -> Any:  # noqa: N802
    """An onnxruntime-backed Florence-2 (see the module docstring); built lazily to keep imports cheap."""
    return _onnx_class()(config, path, variant, threads)


@functools.cache
def _onnx_class() -> type:
    import numpy as np
    import torch
    from torch import nn
    from transformers import Florence2Config, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

    class OnnxFlorence2Model(PreTrainedModel, GenerationMixin):
        config_class = Florence2Config
        main_input_name = "input_ids"
        _supports_sdpa = True  # nothing runs in torch; this only satisfies PreTrainedModel's init checks
        runs_onnx = True  # its one parameter is an anchor for generate(): no device move, no --attn choice

        def __init__(self, config: Any, path: Path, variant: str, threads: int) -> None:
            import onnxruntime as ort

            super().__init__(config)
            self._anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # device and dtype for generate()
            self.path, self.variant = Path(path), variant
            options = ort.SessionOptions()
            # generate() runs torch (logits processing, the cache) between the graphs on the same cores: threads
            # left spinning after a graph take those cores from it (int8 base at 768 px: ~20 % slower spinning)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.intra_op_num_threads = self.threads = session_threads(threads)
            suffix = SUFFIXES[variant]
            self.sessions = {name: _session(self.path / "onnx" / f"{name}{suffix}.onnx", options) for name in GRAPHS}
            decoder = self.sessions["decoder_model_merged"]
            self.output_names = [o.name for o in decoder.get_outputs()]
            # a later step's present.*.encoder.* are empty placeholders (the first step's cache is kept): not fetched
            self.later_outputs = [n for n in self.output_names if ".encoder." not in n]
            self.n_layers = sum(1 for i in decoder.get_inputs() if i.name.endswith(".decoder.key"))
            text = config.text_config
            self.heads, self.head_dim = text.decoder_attention_heads, text.d_model // text.decoder_attention_heads
            self.eval()

        def encode(self, input_ids: Any, attention_mask: Any, pixel_values: Any) -> tuple[Any, Any]:
            """Encoder states and their mask: image features, then the embedded prompt (as Transformers.js)."""
            run = self.sessions
            image = run["vision_encoder"].run(None, {"pixel_values": pixel_values.float().numpy()})[0]
            n = image.shape[1]
            if input_ids.shape[1] < n or not bool((input_ids[:, :n] == self.config.image_token_id).all()):
                raise UserError(f"the processor in '{self.path}' does not put {n} <image> tokens first; "
                                "export the model again")
            ids = input_ids[:, n:].numpy().astype(np.int64)
            text = run["embed_tokens"].run(None, {"input_ids": ids})[0]
            embeds = np.concatenate([image, text], axis=1)
            mask = attention_mask.numpy().astype(np.int64)
            hidden = run["encoder_model"].run(None, {"inputs_embeds": embeds, "attention_mask": mask})[0]
            return torch.from_numpy(hidden), attention_mask

        def generate(self, input_ids: Any = None, attention_mask: Any = None, pixel_values: Any = None,
                     **kwargs: Any) -> Any:
            if pixel_values is None or input_ids is None:
                return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden, mask = self.encode(input_ids, attention_mask, pixel_values)
            return super().generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                                    **kwargs)

        def forward(self, decoder_input_ids: Any = None, encoder_outputs: Any = None, attention_mask: Any = None,
                    cache: Any = None, **kwargs: Any) -> Any:
            """One decoder step; fills transformers' EncoderDecoderCache so generate() can reorder it for beams."""
            cache = cache if cache is not None else kwargs.get("past_key_values")  # transformers < 5.40 name
            hidden = encoder_outputs[0]
            embeds = self.sessions["embed_tokens"].run(None, {"input_ids": decoder_input_ids.numpy()})[0]
            have_past = cache is not None and cache.get_seq_length() > 0
            feeds = {
                "inputs_embeds": embeds,
                "encoder_attention_mask": attention_mask.numpy().astype(np.int64),
                "encoder_hidden_states": hidden.numpy(),
                "use_cache_branch": np.array([have_past]),
            }
            empty = np.zeros((embeds.shape[0], self.heads, 0, self.head_dim), dtype=np.float32)
            for i in range(self.n_layers):
                for kind, part in (("decoder", "self_attention_cache"), ("encoder", "cross_attention_cache")):
                    layer = getattr(cache, part).layers[i] if have_past else None
                    feeds[f"past_key_values.{i}.{kind}.key"] = layer.keys.numpy() if layer is not None else empty
                    feeds[f"past_key_values.{i}.{kind}.value"] = layer.values.numpy() if layer is not None else empty
            wanted = self.later_outputs if have_past else self.output_names
            named = dict(zip(wanted, self.sessions["decoder_model_merged"].run(wanted, feeds), strict=True))
            if cache is not None:
                step = embeds.shape[1]
                for i in range(self.n_layers):
                    cache.self_attention_cache.update(
                        torch.from_numpy(named[f"present.{i}.decoder.key"][:, :, -step:]),
                        torch.from_numpy(named[f"present.{i}.decoder.value"][:, :, -step:]), i)
                    if not have_past:
                        cache.cross_attention_cache.update(torch.from_numpy(named[f"present.{i}.encoder.key"]),
                                                           torch.from_numpy(named[f"present.{i}.encoder.value"]), i)
                        cache.is_updated[i] = True
            return Seq2SeqLMOutput(logits=torch.from_numpy(named["logits"]))

    return OnnxFlorence2Model
