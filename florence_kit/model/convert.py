"""``florence-kit convert``: Microsoft-format Florence-2 checkpoints and LoRA adapters → native transformers ones.

Two years of fine-tunes were made on Microsoft's remote-code model (``trust_remote_code=True``). This module
rewrites such a folder as a native ``Florence2ForConditionalGeneration`` checkpoint + ``Florence2Processor``,
reading only data files: the remote ``*.py`` files are never imported or run, and weights are read from
safetensors or through ``torch.load(weights_only=True)`` (no pickled code runs). The result gives the
reference implementation's outputs (tests/fixtures/ms_florence holds the golden outputs it is tested against).

What decides exactness (each is caught by the golden test):
- ``image_projection`` is an (in, out) matrix used as ``x @ W``; the native projector is a Linear: transpose.
- the remote code never re-ties the lm_head on load, so a fine-tune's head can differ from the embeddings:
  the head is copied as saved and the native config unties it (top-level ``tie_word_embeddings: false``;
  the text config's flag, which ties encoder/decoder embeddings to ``shared``, stays true).
- the remote ``generate()`` takes its settings from ``text_config`` (``forced_bos_token_id: 0`` lives only
  there): they are carried into the native ``generation_config.json``.
- ``<image>`` goes after Microsoft's 1024 added tokens (51289 for the released vocabularies); the embedding
  is padded to a multiple of 64 and the padding ids are suppressed in generation (they have no logits in the
  original model).
- ``final_logits_bias`` does not exist natively: it must be zero.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError, first_line

# Microsoft's processor adds these when it loads (processing_florence2.py), in this order.
MS_ADDED_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{i}>" for i in range(1000)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>",
       "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>",
       "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
)
IMAGE_TOKEN = "<image>"
VOCAB_MULTIPLE = 64
MS_PREFIX = "microsoft/Florence-2-"
NATIVE_ORG = "florence-community"
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# Generation settings of Microsoft's text_config that its generate() uses (GenerationConfig.from_model_config).
GENERATION_KEYS = (
    "num_beams", "no_repeat_ngram_size", "early_stopping", "length_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "min_length", "max_length", "repetition_penalty", "encoder_no_repeat_ngram_size",
    "num_beam_groups", "diversity_penalty", "bad_words_ids", "begin_suppress_tokens", "suppress_tokens",
)
# BART settings the native text config takes over from Microsoft's florence2_language config.
TEXT_KEYS = (
    "max_position_embeddings", "encoder_layers", "encoder_ffn_dim", "encoder_attention_heads", "decoder_layers",
    "decoder_ffn_dim", "decoder_attention_heads", "encoder_layerdrop", "decoder_layerdrop", "activation_function",
    "d_model", "dropout", "attention_dropout", "activation_dropout", "init_std", "classifier_dropout",
    "scale_embedding", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
    "forced_eos_token_id", "is_encoder_decoder",
)
# Phrase-grounding words Microsoft's post-processor never grounds (as the transformers conversion records them).
BANNED_GROUNDING_TOKENS = (
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they", "them",
    "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself", "himself", "herself",
    "itself", "ourselves", "yourselves", "themselves", "this", "that", "these", "those", "who", "whom", "whose",
    "which", "what", "all", "another", "any", "anybody", "anyone", "anything", "each", "everybody", "everyone",
    "everything", "few", "many", "nobody", "none", "several", "some", "somebody", "someone", "something",
    "each other", "one another", "the image", "image", "images", "the", "a", "an", "a group", "other objects", "lots",
    "a set",
)

# Microsoft name → native name, for every tensor of the remote-code model (anchored; first match wins).
_B = r"vision_tower\.blocks\.(\d+)\.(\d+)\."
KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^vision_tower\.convs\.(\d+)\.proj\.(weight|bias)$", r"model.vision_tower.convs.\1.conv.\2"),
    (r"^vision_tower\.convs\.(\d+)\.norm\.(weight|bias)$", r"model.vision_tower.convs.\1.norm.\2"),
    (_B + r"(spatial|channel)_block\.conv([12])\.fn\.dw\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.conv\4.\5"),
    (_B + r"spatial_block\.window_attn\.norm\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.spatial_block.norm1.\3"),
    (_B + r"spatial_block\.window_attn\.fn\.(qkv|proj)\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.spatial_block.window_attn.\3.\4"),
    (_B + r"channel_block\.channel_attn\.norm\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.channel_block.norm1.\3"),
    (_B + r"channel_block\.channel_attn\.fn\.(qkv|proj)\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.channel_block.channel_attn.\3.\4"),
    (_B + r"(spatial|channel)_block\.ffn\.norm\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.norm2.\4"),
    (_B + r"(spatial|channel)_block\.ffn\.fn\.net\.(fc1|fc2)\.(weight|bias)$",
     r"model.vision_tower.blocks.\1.\2.\3_block.ffn.\4.\5"),
    (r"^image_projection$", "model.multi_modal_projector.image_projection.weight"),
    (r"^image_proj_norm\.(weight|bias)$", r"model.multi_modal_projector.image_proj_norm.\1"),
    (r"^image_pos_embed\.(row|column)_embeddings\.weight$",
     r"model.multi_modal_projector.image_position_embed.\1_embeddings.weight"),
    (r"^visual_temporal_embed\.pos_idx_to_embed$",
     "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    (r"^language_model\.model\.(.+)$", r"model.language_model.\1"),
    (r"^language_model\.lm_head\.weight$", "lm_head.weight"),
))
DROPPED = {"language_model.final_logits_bias"}  # checked to be zero, then dropped (the native model has none)


@dataclass
class ConvertReport:
    """What a conversion did, for the CLI's summary and for tests."""

    kind: str  # "checkpoint" | "adapter"
    out: Path
    mapped: dict[str, str] = field(default_factory=dict)  # source name -> native name
    notes: list[str] = field(default_factory=list)
    dtype: str = ""
    vocab_size: int = 0
    image_token_id: int = 0
    unmatched_targets: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- recognising


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"'{path}' is not UTF-8 text (byte {exc.start}); JSON files are UTF-8: restore it from the "
                        "original checkpoint") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc}); restore it from the original checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' does not hold a JSON object; restore it from the original checkpoint")
    return data


def is_microsoft_config(config: dict[str, Any]) -> bool:
    """Microsoft's format: native configs also say ``model_type: florence2``, but have no ``auto_map`` and
    name the vision widths ``embed_dim``, not ``dim_embed``."""
    return config.get("model_type") == "florence2" and (
        "auto_map" in config or "dim_embed" in (config.get("vision_config") or {})
    )


def is_microsoft_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return is_microsoft_config(json.loads(config.read_text(encoding="utf-8")))
    except (ValueError, AttributeError):  # not UTF-8 or not JSON: reported by whoever reads it for real
        return False


def is_microsoft_adapter(path: Path) -> bool:
    """A PEFT adapter trained on the remote-code model: its base is a ``microsoft/Florence-2-*`` id or a
    Microsoft-format folder, or its target modules use the remote code's names."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError:  # not UTF-8 or not JSON: reported when it is converted
        return False
    base = str(config.get("base_model_name_or_path") or "")
    if base.startswith(MS_PREFIX) or (Path(base).is_dir() and is_microsoft_checkpoint(Path(base))):
        return True
    keys = _adapter_keys(path)
    return any(k.startswith("base_model.model.language_model.model.") or ".fn.net." in k for k in keys)


def convert_command(path: Path | str) -> str:
    """The exact command that converts ``path`` (what the refusal messages tell users to run)."""
    src = str(path)
    name = Path(src).name or "model"
    return f"florence-kit convert {src} {Path(src).parent / (name + '-native')}"


# ---------------------------------------------------------------------------------------------- weights


def map_key(name: str) -> str | None:
    """The native name of a Microsoft tensor, or None if no rule knows it."""
    for pattern, repl in KEY_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def map_module(name: str) -> str | None:
    """The native name of a Microsoft module (for adapter keys): the rule for its ``.weight``."""
    native = map_key(name + ".weight")
    return native.removesuffix(".weight") if native else None


def read_weights(folder: Path) -> dict[str, Any]:
    """All tensors of a checkpoint folder: safetensors read directly, ``.bin`` only with ``weights_only``."""
    index_st, index_bin = folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index_st.is_file():
        files = [folder / f for f in sorted(set(read_json(index_st).get("weight_map", {}).values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    elif index_bin.is_file():
        files = [folder / f for f in sorted(set(read_json(index_bin).get("weight_map", {}).values()))]
    else:
        raise UserError(f"'{folder}' has no weights (none of {', '.join(WEIGHT_FILES)}); copy the checkpoint's "
                        "weight files into it")
    state: dict[str, Any] = {}
    for file in files:
        state.update(read_tensor_file(file))
    return state


def read_tensor_file(file: Path) -> dict[str, Any]:
    """One .safetensors or .bin file; damaged files and pickles holding more than tensors are one line."""
    import torch

    if not file.is_file():
        raise UserError(f"'{file}' is missing (the index names it); copy the complete checkpoint")
    if file.stat().st_size == 0:
        raise UserError(f"'{file}' is empty (0 bytes): the download or copy did not finish; copy it again")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"'{file}' is truncated or damaged ({first_line(exc)}); copy it again") from None
    try:
        data = torch.load(str(file), map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types; each means the same to the user
        text = first_line(exc)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Unsupported operand" in str(exc):
            raise UserError(f"'{file}' holds more than tensors (pickled objects that could run code: {text}); "
                            "load it where you trust it and re-save the state dict with safetensors") from None
        raise UserError(f"'{file}' is truncated or damaged ({type(exc).__name__}: {text}); copy it again") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"'{file}' does not hold a state dict of tensors; re-save the model with save_pretrained")
    return data


def _dominant_dtype(state: dict[str, Any]) -> Any:
    """The dtype most floating-point parameters have (what the checkpoint was saved in)."""
    counts: dict[Any, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.__getitem__)


# ---------------------------------------------------------------------------------------------- config


def native_config(ms: dict[str, Any], vocab_size: int, image_token_id: int, tie_head: bool, dtype: Any) -> Any:
    """Florence2Config from Microsoft's config.json (vision: DaViT fields renamed; text: the BART fields)."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    vision = ms.get("vision_config") or {}
    text = ms.get("text_config") or {}
    missing = [k for k in ("dim_embed", "depths", "num_heads", "num_groups", "patch_size", "patch_stride",
                           "patch_padding", "patch_prenorm", "window_size", "projection_dim") if k not in vision]
    if missing or not text:
        raise UserError(f"config.json lacks {', '.join(missing) or 'text_config'}: not a complete Microsoft "
                        "Florence-2 config; restore config.json from the checkpoint it was trained from")
    pos = vision.get("image_pos_embed") or {"type": "learned_abs_2d", "max_pos_embeddings": 50}
    temporal = vision.get("visual_temporal_embedding") or {"type": "COSINE", "max_temporal_embeddings": 100}
    sources = list(vision.get("image_feature_source") or ["spatial_avg_pool", "temporal_avg_pool"])
    if pos.get("type") != "learned_abs_2d" or temporal.get("type") != "COSINE" or sources != [
        "spatial_avg_pool", "temporal_avg_pool"
    ]:
        raise UserError("this Florence-2 variant (image_pos_embed/visual_temporal_embedding/image_feature_source "
                        f"{pos.get('type')}/{temporal.get('type')}/{sources}) has no native transformers model")
    vision_cfg = Florence2VisionConfig(
        embed_dim=list(vision["dim_embed"]), depths=list(vision["depths"]), num_heads=list(vision["num_heads"]),
        num_groups=list(vision["num_groups"]), patch_size=list(vision["patch_size"]),
        patch_stride=list(vision["patch_stride"]), patch_padding=list(vision["patch_padding"]),
        patch_prenorm=list(vision["patch_prenorm"]), window_size=vision["window_size"],
        drop_path_rate=vision.get("drop_path_rate", 0.1), mlp_ratio=4.0,  # the remote DaViT always uses 4
        projection_dim=vision["projection_dim"],
        max_temporal_embeddings=temporal["max_temporal_embeddings"], max_position_embeddings=pos["max_pos_embeddings"],
    )
    text_kw = {k: text[k] for k in TEXT_KEYS if k in text}
    text_cfg = BartConfig(vocab_size=vocab_size, tie_word_embeddings=True, **text_kw)
    config = Florence2Config(
        vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(), image_token_id=image_token_id,
        tie_word_embeddings=tie_head,
        bos_token_id=text.get("bos_token_id", 0), pad_token_id=text.get("pad_token_id", 1),
        eos_token_id=text.get("eos_token_id", 2), decoder_start_token_id=text.get("decoder_start_token_id", 2),
    )
    config.dtype = dtype
    return config


def native_generation_config(ms: dict[str, Any], suppress: list[int]) -> Any:
    """The settings Microsoft's generate() used: its text_config's (not generation_config.json's)."""
    from transformers import GenerationConfig

    text = ms.get("text_config") or {}
    defaults = GenerationConfig().to_dict()
    old_defaults = {"max_length": 20, "min_length": 0}  # transformers 4.x wrote these into every config
    settings = {k: text[k] for k in GENERATION_KEYS
                if k in text and text[k] != defaults.get(k) and text[k] != old_defaults.get(k, object())}
    if suppress:
        settings["suppress_tokens"] = sorted(set(settings.get("suppress_tokens") or []) | set(suppress))
    return GenerationConfig(
        bos_token_id=text.get("bos_token_id", 0), eos_token_id=text.get("eos_token_id", 2),
        pad_token_id=text.get("pad_token_id", 1), decoder_start_token_id=text.get("decoder_start_token_id", 2),
        **settings,
    )


# ---------------------------------------------------------------------------------------------- processor


def native_processor(src: Path, image_seq_length: int | None = None) -> Any:
    """Florence2Processor from the folder's tokenizer files and preprocessor_config.json, without remote code.

    The tokenizer gets what Microsoft's processor adds when it loads (its 1024 task and location tokens, a
    no-op where a fine-tune saved them already), then ``<image>`` after them, as native checkpoints have it.
    """
    from tokenizers import AddedToken
    from transformers import BartTokenizer, CLIPImageProcessorPil, Florence2Processor

    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"'{src}' has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy them from the "
                        "checkpoint the model was trained from (e.g. microsoft/Florence-2-base)")
    pre_file = src / "preprocessor_config.json"
    if not pre_file.is_file():
        raise UserError(f"'{src}' has no preprocessor_config.json; copy it from the checkpoint the model was "
                        "trained from (e.g. microsoft/Florence-2-base)")
    pre = read_json(pre_file)
    try:
        tokenizer = BartTokenizer.from_pretrained(str(src))
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file fails in many ways
        raise UserError(f"the tokenizer in '{src}' cannot be read ({first_line(exc)}); copy tokenizer.json / "
                        "vocab.json again from the original checkpoint") from None
    tokenizer.add_special_tokens({"additional_special_tokens": MS_ADDED_TOKENS})
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    with tempfile.TemporaryDirectory() as tmp:  # reload so that <image> is the tokenizer's named image_token
        tokenizer.save_pretrained(tmp)
        tokenizer = BartTokenizer.from_pretrained(tmp, extra_special_tokens={"image_token": IMAGE_TOKEN})
    size = pre.get("size") or {"height": 768, "width": 768}
    seq_len = image_seq_length or pre.get("image_seq_length")
    if not seq_len:
        raise UserError(f"'{pre_file}' lacks image_seq_length; copy it from the original checkpoint")
    image_processor = CLIPImageProcessorPil(
        do_resize=pre.get("do_resize", True), size={"height": size["height"], "width": size["width"]},
        resample=pre.get("resample", 3), do_center_crop=False,
        crop_size=pre.get("crop_size") or {"height": size["height"], "width": size["width"]},
        do_rescale=pre.get("do_rescale", True), rescale_factor=pre.get("rescale_factor", 1 / 255),
        do_normalize=pre.get("do_normalize", True), image_mean=pre.get("image_mean", [0.485, 0.456, 0.406]),
        image_std=pre.get("image_std", [0.229, 0.224, 0.225]), do_convert_rgb=pre.get("do_convert_rgb"),
        image_seq_length=seq_len,
    )
    post = {"ocr": {"pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>"
                               r"<loc_(\d+)>", "area_threshold": 0.0},
            "phrase_grounding": {"banned_grounding_tokens": list(BANNED_GROUNDING_TOKENS)},
            "pure_text": {}, "description_with_bboxes": {}, "description_with_polygons": {}, "polygons": {},
            "bboxes": {}, "description_with_bboxes_or_polygons": {}}
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer, post_processor_config=post)


# ---------------------------------------------------------------------------------------------- checkpoint


def convert_weights(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Rename (and transpose ``image_projection``); every source tensor must map or be a checked drop."""
    import torch

    unknown = sorted(k for k in state if k not in DROPPED and map_key(k) is None)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        raise UserError(f"the weights hold tensors a Microsoft Florence-2 does not have ({shown}): not a "
                        "Microsoft-format Florence-2 checkpoint, or a modified one that cannot be converted")
    bias = state.get("language_model.final_logits_bias")
    if bias is not None and bool(torch.any(bias != 0)):
        raise UserError("language_model.final_logits_bias is not zero: the native Florence-2 has no such bias, so "
                        "this fine-tune cannot be converted exactly (fold it into lm_head is not possible without "
                        "a bias term)")
    out, mapping = {}, {}
    for name, tensor in state.items():
        if name in DROPPED:
            continue
        native = map_key(name)
        assert native is not None
        if name == "image_projection":
            tensor = tensor.t()
        out[native] = tensor.contiguous()
        mapping[name] = native
    # the remote code ties the encoder/decoder embeddings to ``shared``; saved copies must agree
    shared = out.get("model.language_model.shared.weight")
    for side in ("encoder", "decoder"):
        key = f"model.language_model.{side}.embed_tokens.weight"
        if key in out:
            copy = out.pop(key)
            if shared is None:
                out["model.language_model.shared.weight"] = shared = copy
            elif not torch.equal(copy, shared):
                raise UserError(f"language_model.model.{side}.embed_tokens differs from language_model.model.shared:"
                                " the remote code ties them, so this checkpoint was modified; it cannot be converted")
    return out, mapping


def _pad_rows(tensor: Any, rows: int) -> Any:
    """Grow a (vocab, d) matrix to ``rows`` rows, new rows = the mean of the old ones (as transformers' resize
    initialises them, without its random sampling, so a conversion is reproducible)."""
    import torch

    if tensor.shape[0] >= rows:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)], dim=0).contiguous()


def expected_native_keys(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a native model of ``config`` saves (tied copies excluded), with its shape."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def convert_checkpoint(src: Path, out: Path, *, dtype: str | None = None, overwrite: bool = False) -> ConvertReport:
    """A Microsoft-format Florence-2 folder → a native checkpoint folder (safetensors + processor)."""
    import torch
    from safetensors.torch import save_file

    ms = read_json(src / "config.json")
    if not is_microsoft_config(ms):
        raise UserError(f"'{src}' is not a Microsoft-format Florence-2 checkpoint (no auto_map or "
                        "vision_config.dim_embed in config.json); a native one needs no conversion")
    check_out(out, overwrite, src)
    state = read_weights(src)
    weights, mapping = convert_weights(state)
    if "model.language_model.shared.weight" not in weights:
        raise UserError(f"the weights in '{src}' lack the language model's token embeddings "
                        "(language_model.model.shared.weight or an embed_tokens copy): an incomplete checkpoint; "
                        "copy the complete one")
    report = ConvertReport(kind="checkpoint", out=out, mapped=mapping)

    processor = native_processor(src)
    n_tokens = len(processor.tokenizer)  # incl. Microsoft's 1024 tokens and <image>
    image_token_id = processor.tokenizer.image_token_id
    old_vocab = weights["model.language_model.shared.weight"].shape[0]
    if old_vocab < image_token_id:
        raise UserError(f"the model's vocabulary ({old_vocab}) is smaller than its tokenizer's ({image_token_id}): "
                        "the tokenizer files do not belong to these weights; copy the ones it was trained with")
    vocab = max(old_vocab, math.ceil(n_tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    head = weights.get("lm_head.weight")
    if head is None:
        report.notes.append("no lm_head in the weights: the head is tied to the token embeddings")
    shared = _pad_rows(weights["model.language_model.shared.weight"], vocab)
    weights["model.language_model.shared.weight"] = shared
    if head is not None:
        weights["lm_head.weight"] = _pad_rows(head, vocab)

    target = getattr(torch, dtype) if dtype else _dominant_dtype(weights)
    weights = {k: (v.to(target) if v.is_floating_point() else v) for k, v in weights.items()}
    config = native_config(ms, vocab, image_token_id, tie_head=head is None, dtype=target)
    expected = expected_native_keys(config)
    unfilled = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
    if unfilled or extra or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}" for what, keys in
                           (("unfilled", unfilled), ("unexpected", extra), ("wrong shape", wrong)) if keys)
        raise UserError(f"the weights do not fit the model config.json describes ({detail}); the config and the "
                        "weights come from different checkpoints")
    generation = native_generation_config(ms, list(range(old_vocab, vocab)))

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    write_atomically(out, overwrite, write)
    report.dtype = str(target).removeprefix("torch.")
    report.vocab_size, report.image_token_id = vocab, image_token_id
    if vocab != old_vocab:
        report.notes.append(f"vocabulary {old_vocab} -> {vocab}: <image> is {image_token_id}, padded to a multiple "
                            f"of {VOCAB_MULTIPLE}; the new ids are suppressed in generation")
    return report


# ---------------------------------------------------------------------------------------------- adapter


def _adapter_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise UserError(f"'{path}' has adapter_config.json but no adapter_model.safetensors (or .bin); copy the "
                    "adapter's weights file into it")


def _adapter_keys(path: Path) -> list[str]:
    try:
        file = _adapter_file(path)
    except UserError:
        return []
    if file.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                return list(f.keys())
        except Exception:  # noqa: BLE001 - a damaged file is reported when it is converted
            return []
    return []


LORA_PARTS = re.compile(r"^(.*?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\..*)?$")


def _suffix_match(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


def resolve_native_base(adapter_cfg: dict[str, Any], base: str | None) -> str:
    """The native base an adapter goes on: ``--base``, else the native twin of the Microsoft id it names."""
    if base:
        path = Path(base).expanduser()
        if path.is_dir():
            if is_microsoft_checkpoint(path):
                raise UserError(f"--base '{path}' is itself in Microsoft's format; convert it first "
                                f"({convert_command(path)}) and pass the converted folder as --base")
            if not (path / "config.json").is_file():
                raise UserError(f"--base '{path}' has no config.json; pass a native Florence-2 checkpoint folder")
            return str(path.resolve())
        if base.startswith(MS_PREFIX):
            return f"{NATIVE_ORG}/Florence-2-{base[len(MS_PREFIX):]}"
        return base
    named = str(adapter_cfg.get("base_model_name_or_path") or "")
    if named.startswith(MS_PREFIX):
        return f"{NATIVE_ORG}/Florence-2-{named[len(MS_PREFIX):]}"
    if named and Path(named).is_dir() and not is_microsoft_checkpoint(Path(named)):
        return str(Path(named).resolve())
    raise UserError(f"the adapter's base '{named or '(none)'}' has no known native twin; convert that base with "
                    "`florence-kit convert BASE_DIR BASE_OUT` and pass --base BASE_OUT")


def _base_shapes(base: str) -> tuple[dict[str, tuple[int, ...]], bool] | None:
    """(native tensor shapes, head tied?) of a local base folder; None for a hub id (checked when loaded)."""
    path = Path(base)
    if not path.is_dir():
        return None
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--base '{file}' is truncated or damaged ({first_line(exc)}); copy the base again "
                            "or convert it again") from None
    config = read_json(path / "config.json")
    return shapes, bool(config.get("tie_word_embeddings", True))


def _pad_vocab_lora(new: dict[str, Any], shapes: dict[str, tuple[int, ...]] | None) -> None:
    """LoRA on the lm_head (B: vocab x r) or the embeddings (A: r x vocab) grows with the native vocabulary,
    which adds ``<image>`` and pads to a multiple of 64: the new rows are zero (no change to any token)."""
    import torch

    for key in list(new):
        if key.endswith("lm_head.lora_B.weight"):
            dim = 0
        elif ".lora_embedding_A" in key:
            dim = 1
        else:
            continue
        rows = new[key].shape[dim]
        known = shapes.get("model.language_model.shared.weight") if shapes else None
        target = known[0] if known else math.ceil((rows + 1) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        if target > rows:
            pad_shape = list(new[key].shape)
            pad_shape[dim] = target - rows
            new[key] = torch.cat([new[key], new[key].new_zeros(pad_shape)], dim=dim)


def convert_adapter(src: Path, out: Path, *, base: str | None = None, overwrite: bool = False) -> ConvertReport:
    """A PEFT LoRA adapter trained on the remote-code model → the same adapter on the native model."""
    from safetensors.torch import save_file

    cfg = read_json(src / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"'{src}' is a {cfg.get('peft_type')} adapter; only LoRA adapters can be converted")
    check_out(out, overwrite, src)
    native_base = resolve_native_base(cfg, base)
    weights = read_tensor_file(_adapter_file(src))
    report = ConvertReport(kind="adapter", out=out)
    new: dict[str, Any] = {}
    old_modules: set[str] = set()
    for key, tensor in weights.items():
        inner = key.removeprefix("base_model.model.")
        m = LORA_PARTS.match(inner)
        if m:
            module, part, rest = m.group(1), m.group(2), m.group(3) or ""
            native = map_module(module)
            old_modules.add(module)
            if native is None:
                raise UserError(f"the adapter adapts '{module}', which a Microsoft Florence-2 does not have; "
                                "it was not trained on Florence-2")
            new_key = f"base_model.model.{native}.{part}{rest}"
        else:
            native = map_key(inner)
            if native is None:
                raise UserError(f"the adapter holds '{key}', which no Florence-2 tensor matches; it cannot be "
                                "converted")
            new_key = f"base_model.model.{native}"
        new[new_key] = tensor
        report.mapped[key] = new_key
    native_modules = sorted({map_module(m) or m for m in old_modules})

    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        report.unmatched_targets = [] if any(re.fullmatch(targets, m) for m in old_modules) else [targets]
    else:
        report.unmatched_targets = sorted(t for t in targets if not any(_suffix_match(m, t) for m in old_modules))
    if report.unmatched_targets:
        report.notes.append(f"target_modules that matched nothing in the Microsoft model (dropped): "
                            f"{', '.join(report.unmatched_targets)}")

    rank = int(cfg.get("r", 8))
    base_info = _base_shapes(native_base)
    _pad_vocab_lora(new, base_info[0] if base_info else None)
    if base_info is not None:
        shapes, tied = base_info
        for module in native_modules:
            weight = shapes.get(f"{module}.weight")
            if weight is None and module == "lm_head" and tied:
                weight = shapes.get("model.language_model.shared.weight")
            a = new.get(f"base_model.model.{module}.lora_A.weight")
            b = new.get(f"base_model.model.{module}.lora_B.weight")
            if weight is None or a is None or b is None:
                continue
            in_features = weight[1] if len(weight) == 2 else weight[1] * math.prod(weight[2:])
            if tuple(a.shape) != (a.shape[0], in_features) or b.shape[0] != weight[0] or a.shape[0] != b.shape[1]:
                raise UserError(f"the adapter does not fit the base '{native_base}' at {module} (LoRA A "
                                f"{tuple(a.shape)}, B {tuple(b.shape)}, base weight {weight}): it was trained on "
                                "another model size")
            if a.shape[0] != rank and not cfg.get("rank_pattern"):
                raise UserError(f"the adapter's rank at {module} is {a.shape[0]}, its config says r={rank}: the "
                                "adapter files do not belong together")
        if "lm_head" in native_modules and tied:
            raise UserError(f"the adapter trains lm_head, but the base '{native_base}' ties lm_head to the token "
                            "embeddings, so merging it would change the embeddings too; convert the Microsoft base "
                            "with `florence-kit convert` (which keeps a separate head) and pass it as --base")
    elif "lm_head" in native_modules:
        raise UserError(f"the adapter trains lm_head, but the base '{native_base}' ties lm_head to the token "
                        "embeddings, so merging it would change the embeddings too; convert the Microsoft base with "
                        f"`florence-kit convert {cfg.get('base_model_name_or_path') or 'BASE'} BASE_OUT` (which keeps "
                        "a separate head) and pass --base BASE_OUT")

    new_cfg = dict(cfg)
    new_cfg.update(
        base_model_name_or_path=native_base, target_modules=native_modules, task_type=None, revision=None,
        rank_pattern={map_module(k) or k: v for k, v in (cfg.get("rank_pattern") or {}).items()},
        alpha_pattern={map_module(k) or k: v for k, v in (cfg.get("alpha_pattern") or {}).items()},
        modules_to_save=[map_module(m) or m for m in cfg.get("modules_to_save") or []] or None,
        auto_mapping=None,
    )

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in new.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")

    write_atomically(out, overwrite, write)
    report.notes.append(f"base: {native_base}")
    return report


# ---------------------------------------------------------------------------------------------- output


def check_out(out: Path, overwrite: bool, src: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT '{out}' is a file; pass a folder to write the converted model into")
    if out.resolve() == src.resolve():
        raise UserError("OUT must be a different folder from SRC (the original would be overwritten)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"OUT '{out}' is not empty; pass --overwrite to replace it, or choose another folder")


def write_atomically(out: Path, overwrite: bool, write: Any) -> None:
    """Write into a temporary folder beside ``out``, then move it in: an existing folder is never left
    half-overwritten (it is replaced only once the new one is complete)."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise UserError(f"OUT '{out}' is not empty; pass --overwrite to replace it")
            old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert(src: str, out: Path, *, base: str | None = None, dtype: str | None = None,
            overwrite: bool = False) -> ConvertReport:
    """Whatever SRC is (a Microsoft checkpoint folder, a Microsoft-trained adapter folder, or a hub id of
    either), convert it into OUT."""
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"--dtype must be float32, float16 or bfloat16, got '{dtype}'")
    path = Path(src).expanduser()
    if not path.exists():
        if src.startswith((".", "/", "~")) or src.count("/") != 1:
            raise UserError(f"SRC '{src}' does not exist; pass a checkpoint folder or a hub id")
        path = download(src)
    if not path.is_dir():
        raise UserError(f"SRC '{path}' is a file; pass the checkpoint folder")
    if (path / "adapter_config.json").is_file():
        if dtype:
            raise UserError("--dtype applies to full checkpoints; an adapter keeps its own dtype")
        return convert_adapter(path, out, base=base, overwrite=overwrite)
    if base:
        raise UserError("--base applies to adapters; SRC is a full checkpoint")
    if not (path / "config.json").is_file():
        raise UserError(f"'{path}' is neither a Florence-2 checkpoint (no config.json) nor an adapter (no "
                        "adapter_config.json); pass the folder the model was saved in")
    return convert_checkpoint(path, out, dtype=dtype, overwrite=overwrite)


def download(repo_id: str) -> Path:
    """A hub repo's data files (never its .py files) into the local cache: safetensors where the repo has them,
    else its .bin weights (read later with weights_only)."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(repo_id)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", *weights]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated repo: one line each
        raise UserError(f"could not download '{repo_id}' from the hub ({first_line(exc)}); download it where the "
                        "hub is reachable and pass the folder") from None
