"""A tiny, randomly initialised Florence-2 that is built entirely offline.

Everything here uses transformers' native classes (``Florence2ForConditionalGeneration``,
``Florence2Processor``, ``BartTokenizer``/``RobertaTokenizer``, ``CLIPImageProcessor(Pil)``) so that a
model saved with :func:`save_tiny` reloads with ``from_pretrained``/``AutoProcessor.from_pretrained``
exactly like the real checkpoints, without ``trust_remote_code`` and without any network access.  It exists
so that tests, CI and the ``florence-kit demo`` can exercise the full fine-tuning pipeline on a CPU.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily so that ``import florence_kit.model.tiny`` stays cheap
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as PreTrainedTokenizerFast

# Token layout (ids are part of the saved checkpoint, so keep this stable).
BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
MASK = "<mask>"
IMAGE_TOKEN = "<image>"
NUM_LOC_TOKENS = 1000
LOC_TOKENS = [f"<loc_{i}>" for i in range(NUM_LOC_TOKENS)]
# 4 BART specials, 256 byte-level symbols, <mask>, <image>, then the 1000 location tokens.
MASK_TOKEN_ID = 4 + 256
IMAGE_TOKEN_ID = MASK_TOKEN_ID + 1
TOKENIZER_SIZE = IMAGE_TOKEN_ID + 1 + NUM_LOC_TOKENS
# The embedding matrix is padded to a multiple of 64 (friendlier to kernels / 4-bit layers); unused rows are
# never produced by the tokenizer.
VOCAB_SIZE = int(math.ceil(TOKENIZER_SIZE / 64) * 64)

DEFAULT_IMAGE_SIZE = 128
# DaViT, shrunk to one stage: a 32x32/stride-32 patch conv + one spatial/channel block.  At 128 px that is a
# 4x4 grid (17 image tokens): one token per 32 px cell of the rendered forms, cheap enough for a CPU demo.
VISION_PATCH_SIZE = (32,)
VISION_PATCH_STRIDE = (32,)
VISION_PATCH_PADDING = (0,)
VISION_PATCH_PRENORM = (False,)
VISION_EMBED_DIM = (128,)
VISION_NUM_HEADS = (4,)
VISION_DEPTHS = (1,)
VISION_WINDOW_SIZE = 4
# Pixel normalisation that maps white paper to 0 (and black ink to -2): blank regions then carry no signal
# and the patch features depend on the ink only.  With ImageNet mean/std the white background dominates every
# patch and a random tiny model needs >10x more steps to start reading (see the demo research notes).
IMAGE_MEAN = (1.0, 1.0, 1.0)
IMAGE_STD = (0.5, 0.5, 0.5)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/BART byte -> printable-unicode table, so the byte-level alphabet matches the real tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build a BART-style byte-level BPE tokenizer with an empty merge table.

    Without merges every byte is its own token ("digit-level"), which makes reading numbers a per-character
    task a tiny model can learn, and needs no trained vocabulary file.  Special ids follow BART (``<s>=0,
    <pad>=1, </s>=2, <unk>=3``); ``<image>`` is declared as the model-specific ``image_token`` (saved in
    ``tokenizer_config.json`` and restored by ``from_pretrained``), which ``Florence2Processor`` requires.
    """
    from tokenizers import AddedToken
    from transformers import BartTokenizer

    vocab: dict[str, int] = {BOS: 0, PAD: 1, EOS: 2, UNK: 3}
    for i, ch in enumerate(sorted(_bytes_to_unicode().items())):
        vocab[ch[1]] = 4 + i
    vocab[MASK] = MASK_TOKEN_ID
    vocab[IMAGE_TOKEN] = IMAGE_TOKEN_ID
    for i, tok in enumerate(LOC_TOKENS):
        vocab[tok] = IMAGE_TOKEN_ID + 1 + i
    tokenizer = BartTokenizer(
        vocab=vocab,
        merges=[],
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
    )
    # Location tokens must be atomic (never split into bytes) but are not "special": decoding with
    # skip_special_tokens=True keeps them, which Florence-2's box/polygon post-processing relies on.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in LOC_TOKENS])
    assert len(tokenizer) == TOKENIZER_SIZE, len(tokenizer)
    assert tokenizer.image_token_id == IMAGE_TOKEN_ID
    return tokenizer


def image_seq_length(
    image_size: int = DEFAULT_IMAGE_SIZE, strides: tuple[int, ...] = VISION_PATCH_STRIDE
) -> int:
    """Number of ``<image>`` placeholders: one per cell of the final feature grid, plus the global token."""
    side = image_size
    for stride in strides:
        side = math.ceil(side / stride)
    return side * side + 1


def build_processor(image_size: int = DEFAULT_IMAGE_SIZE) -> Florence2Processor:
    """CLIP-style image processor (square resize, no crop) + :func:`build_tokenizer`, like Florence-2.

    The PIL backend is used so that pixel values do not depend on torchvision being installed.  (The saved
    ``image_processor_type`` is still "CLIPImageProcessor"; without torchvision ``AutoProcessor`` falls back
    to the PIL class with a warning.)  ``image_seq_length`` assumes the default vision strides: after
    overriding ``vision_patch_stride`` in :func:`tiny_config`, rebuild it with :func:`image_seq_length`.
    """
    from transformers import CLIPImageProcessorPil, Florence2Processor

    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic, as in the released Florence-2 processors
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
        image_seq_length=image_seq_length(image_size),
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=build_tokenizer())


def tiny_config(
    vocab_size: int = VOCAB_SIZE, image_size: int = DEFAULT_IMAGE_SIZE, **overrides: Any
) -> Florence2Config:
    """A ~1.8 M parameter Florence-2 config: 1-stage DaViT + 2+2-layer BART, widths multiples of 64.

    ``overrides``: keys prefixed ``vision_`` go to the vision config (e.g. ``vision_depths=(2,)``),
    ``image_token_id``/``tie_word_embeddings`` to the top-level config, everything else to the BART text
    config (e.g. ``d_model=256``, ``dropout=0.1``).
    """
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    top_keys = {"image_token_id", "tie_word_embeddings"}
    vision_kw = {k.removeprefix("vision_"): v for k, v in overrides.items() if k.startswith("vision_")}
    top_kw = {k: v for k, v in overrides.items() if k in top_keys}
    text_kw = {k: v for k, v in overrides.items() if not k.startswith("vision_") and k not in top_keys}

    d_model = text_kw.pop("d_model", 128)
    vision = {
        "depths": VISION_DEPTHS,
        "patch_size": VISION_PATCH_SIZE,
        "patch_stride": VISION_PATCH_STRIDE,
        "patch_padding": VISION_PATCH_PADDING,
        "patch_prenorm": VISION_PATCH_PRENORM,
        "embed_dim": VISION_EMBED_DIM,
        "num_heads": VISION_NUM_HEADS,
        "num_groups": VISION_NUM_HEADS,
        "window_size": VISION_WINDOW_SIZE,
        "drop_path_rate": 0.0,
        "mlp_ratio": 2.0,
        "projection_dim": d_model,
        "max_position_embeddings": 64,
    }
    vision.update(vision_kw)
    vision["projection_dim"] = d_model
    text = {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 256,
        "decoder_ffn_dim": 256,
        "max_position_embeddings": 1024,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "scale_embedding": False,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_eos_token_id": None,
        "forced_bos_token_id": None,
        "is_encoder_decoder": True,
    }
    text.update(text_kw)
    del image_size  # the vision tower is resolution-agnostic; image_size only matters to the processor
    return Florence2Config(
        vision_config=Florence2VisionConfig(**vision).to_dict(),
        text_config=BartConfig(**text).to_dict(),
        image_token_id=top_kw.get("image_token_id", IMAGE_TOKEN_ID),
        tie_word_embeddings=top_kw.get("tie_word_embeddings", True),
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )


def reinit_default(model: Any) -> None:
    """Re-initialise every Linear/Conv2d/LayerNorm/Embedding with PyTorch's own ``reset_parameters()``.

    transformers initialises weights with N(0, 0.02), tuned for wide models; at width 128 the image signal
    reaching the decoder is so small that a random tiny Florence-2 stays at the answer prior (measured:
    held-out ANLS 0.02 after 600 steps, vs 1.0 with this init).  PyTorch's fan-in scaled Linear/Conv init
    helps partly (0.15 when the embeddings keep N(0, 0.02)); resetting the embeddings to N(0, 1) as well
    (text positions and the 2-D image row/column embeddings then are as strong as the content they are added
    to) gives the 1.0.  The token embedding, tied to the lm_head, is then rescaled to
    N(0, 1/d_model) so that initial logits stay O(1) (initial loss ~ log(vocab)).
    """
    import torch
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding)):
            module.reset_parameters()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight.normal_(0.0, 1.0 / math.sqrt(emb.weight.shape[1]))


def make_tiny(
    seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """Build the tiny model (seeded, :func:`reinit_default`) and its processor; generation is plain greedy."""
    import torch
    from transformers import Florence2ForConditionalGeneration, GenerationConfig

    processor = build_processor(image_size)
    config = tiny_config(VOCAB_SIZE, image_size)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    torch.manual_seed(seed)
    reinit_default(model)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        max_new_tokens=32,
    )
    model.eval()
    return model, processor


def save_tiny(
    out_dir: str | pathlib.Path, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE
) -> pathlib.Path:
    """Save model (safetensors) + processor to ``out_dir`` so ``from_pretrained`` works offline."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = make_tiny(seed=seed, image_size=image_size)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
