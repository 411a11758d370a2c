"""How much memory a fine-tuning run needs: a model of peak memory, and the planner built on it.

peak = fixed + batch × per-sample activations, where
  fixed       = weights + gradients + optimizer state (+ the optimizer step's temporaries) + overhead
  activations = what autograd keeps between forward and backward, summed layer by layer
                (DaViT blocks per stage, BART encoder/decoder layers, the LM head's logits).
qlora on CPU: the peak is at least the load's (the mapped checkpoint next to the 4-bit weights; see estimate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florence_kit.model.modes import TABLE, TrainingMode, mode_row

# Florence-2 sizes (transformers' Florence2VisionConfig defaults are the base tower).
BASE_TEXT = {"d_model": 768, "layers": 6, "heads": 12, "ffn": 3072}
LARGE_TEXT = {"d_model": 1024, "layers": 12, "heads": 16, "ffn": 4096}
BUILTIN = {
    "base": {
        "vision": {"embed_dim": (128, 256, 512, 1024), "num_heads": (4, 8, 16, 32), "num_groups": (4, 8, 16, 32)},
        "text": BASE_TEXT,
    },
    "large": {
        "vision": {"embed_dim": (256, 512, 1024, 2048), "num_heads": (8, 16, 32, 64), "num_groups": (8, 16, 32, 64)},
        "text": LARGE_TEXT,
    },
}
VOCAB_SIZE = 51289
IMAGE_SIZE = 768


def builtin_config(name: str) -> Any:
    """The Florence2Config of ``base`` or ``large`` (random weights from it, never a download)."""
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    spec = BUILTIN[name]
    text = spec["text"]
    vision = Florence2VisionConfig(
        depths=(1, 1, 9, 1), patch_size=(7, 3, 3, 3), patch_stride=(4, 2, 2, 2), patch_padding=(3, 1, 1, 1),
        patch_prenorm=(False, True, True, True), window_size=12, drop_path_rate=0.1, mlp_ratio=4.0,
        projection_dim=text["d_model"], **spec["vision"],
    )
    bart = BartConfig(
        vocab_size=VOCAB_SIZE, d_model=text["d_model"], encoder_layers=text["layers"], decoder_layers=text["layers"],
        encoder_attention_heads=text["heads"], decoder_attention_heads=text["heads"],
        encoder_ffn_dim=text["ffn"], decoder_ffn_dim=text["ffn"], max_position_embeddings=1024,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, scale_embedding=False,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None, is_encoder_decoder=True,
    )
    # The released checkpoints put <image> after the BART vocabulary; with random weights any id inside the
    # embedding table does (memory does not depend on which).
    return Florence2Config(
        vision_config=vision.to_dict(), text_config=bart.to_dict(), image_token_id=VOCAB_SIZE - 1,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )


def with_positions(config: Any, target: int) -> Any:
    """``config``, its position tables grown to hold ``target`` tokens where they are shorter (as ``finetune
    --max-target-length`` grows them: the new rows are parameters that train, with gradients and optimizer state)."""
    if target <= config.text_config.max_position_embeddings:
        return config
    import copy

    grown = copy.deepcopy(config)
    grown.text_config.max_position_embeddings = target
    return grown


def load_config(model: str) -> Any:
    """A Florence2Config from ``base``/``large`` (built in, offline), ``tiny``, or a checkpoint folder."""

    from florence_kit.common.errors import UserError

    if model in BUILTIN:
        return builtin_config(model)
    if model == "tiny":
        from florence_kit.model.tiny import tiny_config

        return tiny_config()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model '{model}': the memory planner needs base, large, tiny or a checkpoint folder with a "
            "config.json (it reads the sizes only; nothing is downloaded)"
        )
    from transformers import Florence2Config

    from florence_kit.model.checkpoint_io import check_local_config

    check_local_config(path)
    return Florence2Config.from_pretrained(str(path))


def image_tokens(config: Any, image_size: int) -> int:
    """(side / total stride)² + 1: 577 at 768×768 for Florence-2."""
    side = image_size
    for stride in config.vision_config.patch_stride:
        side = -(-side // stride)
    return side * side + 1


# ---------------------------------------------------------------------------------------------------------
# Sizes of the model, read from a model built on the meta device (exact, instant, no weights)


@dataclass(frozen=True)
class Sizes:
    """Parameter counts per component and the shapes the activation terms need."""

    vision: int
    projector: int
    language: int  # BART incl. the token embeddings (the LM head is tied to them)
    linear: int  # weights of nn.Linear layers outside the projector/LM head (what 4-bit quantises)
    lora_targets: tuple[tuple[int, int], ...]  # (in, out) of every language q/k/v/out/fc1/fc2
    embed_dim: tuple[int, ...]
    depths: tuple[int, ...]
    strides: tuple[int, ...]
    d_model: int
    ffn: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    vocab: int
    stored: float = 4.0  # bytes per parameter in the checkpoint file (config dtype: fp32 unless it says 16-bit)
    vision_lora_targets: tuple[tuple[int, int], ...] = ()  # (in, out) of what --lora-vision wraps in DaViT
    attention_dropout: float = 0.1  # the text model's: without it the decoder's causal self-attention runs fused

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language


LORA_TARGET = re.compile(
    r"model\.language_model\.(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
)


def sizes(config: Any) -> Sizes:
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.adapters import VISION_TARGETS

    vision_target = re.compile(VISION_TARGETS)
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    inner = model.model

    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    linear, targets, vision_targets = 0, [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "multi_modal_projector" not in name and name != "lm_head":
            linear += module.weight.numel()
            if LORA_TARGET.fullmatch(name):
                targets.append((module.in_features, module.out_features))
            elif vision_target.fullmatch(name):
                vision_targets.append((module.in_features, module.out_features))
    text, vision = config.text_config, config.vision_config
    dtype = str(getattr(config, "dtype", None) or "float32")
    return Sizes(
        vision=count(inner.vision_tower), projector=count(inner.multi_modal_projector),
        language=count(inner.language_model), linear=linear, lora_targets=tuple(targets),
        embed_dim=tuple(vision.embed_dim), depths=tuple(vision.depths), strides=tuple(vision.patch_stride),
        d_model=text.d_model, ffn=max(text.encoder_ffn_dim, text.decoder_ffn_dim),
        heads=max(text.encoder_attention_heads, text.decoder_attention_heads),
        encoder_layers=text.encoder_layers, decoder_layers=text.decoder_layers, vocab=text.vocab_size,
        stored=2.0 if dtype.removeprefix("torch.") in ("float16", "bfloat16") else 4.0,
        vision_lora_targets=tuple(vision_targets), attention_dropout=float(getattr(text, "attention_dropout", 0.1)),
    )


# ---------------------------------------------------------------------------------------------------------
# Activations: what autograd keeps per sample, in fp32 elements (a 1-byte dropout mask counts 1/4).
# The coefficients were read off torch.autograd.graph.saved_tensors_hooks on the base model (every saved
# tensor's storage counted once, attributed to the layer running; PyTorch 2.13 CPU, SDPA attention,
# dropout 0.1, drop-path 0.1) at 192, 384 and 768 px and 16/64 target tokens; the counts are linear in
# tokens × width, plus 3 fp32 (heads × tokens²) tensors per attention (probabilities, dropout, mask).
VISION_BLOCK = 38.1  # one DaViT block (spatial + channel half), × tokens × channels of its stage
# --lora-vision: the frozen base Linear layers keep no input, but LoRA's dropout keeps a mask and the dropped
# input of each of the 8 wrapped layers, and the frozen depthwise convs still keep theirs (stages 2-4 of base
# at 384 and 768 px: 53.2-53.6; stage 1, whose first block's input needs no gradient, 51.1). The stage-1 patch
# conv (frozen, on the pixels) keeps nothing.
VISION_BLOCK_LORA = 53.4
VISION_PATCH = 4.0  # the pre-normed patch conv of stages 2-4, × tokens × channels of the stage
PROJECTOR = 1.75  # × tokens × channels of the last stage
ATTN = 3  # × heads × query tokens × key tokens
# BART layers, × tokens × d_model (+ 2.25 × tokens × ffn for fc1/GELU/dropout), keyed by the language
# model's setting in the modes table; LoRA's dropout on the adapters' inputs adds the difference (measured
# with lora_dropout 0.05, r 16).
ENCODER = {"full": 13.0, "lora": 23.6}
DECODER = {"full": 18.0, "lora": 30.7}
CROSS_KV = {"full": 2.17, "lora": 6.04}  # per decoder layer, × encoder tokens × d_model (cross-attn K, V)
FFN = 2.25


@dataclass(frozen=True)
class Shape:
    """Tokens of one sample: image tokens + prompt (encoder), target (decoder)."""

    image_size: int
    prompt: int = 32
    target: int = 64


def _stage_tokens(s: Sizes, image_size: int) -> list[int]:
    side, out = image_size, []
    for stride in s.strides:
        side = -(-side // stride)
        out.append(side * side)
    return out


def activations(
    s: Sizes, mode: str, shape: Shape, checkpointing: bool, fused_attention: bool = False, lora_vision: bool = False
) -> tuple[float, float]:
    """(kept, transient) fp32 elements per sample.

    ``kept`` lives from the forward to the backward; ``transient`` is the largest extra live at once on top
    of it (with checkpointing: one layer recomputed during the backward). ``fused_attention``: SDPA runs a
    flash / memory-efficient kernel (CUDA), which keeps one log-sum-exp per query row instead of the
    heads × tokens² probabilities, dropout mask and attention mask the CPU path keeps.
    ``lora_vision`` (adapter modes): the tower's adapters train, so the backward runs through it and its blocks
    keep their activations, as in full fine-tuning.
    """
    plan = mode_row(mode).plan(lora_vision)
    attn = 0 if fused_attention else ATTN
    tokens = _stage_tokens(s, shape.image_size)
    enc_t = tokens[-1] + 1 + shape.prompt + 2
    dec_t = shape.target
    d, h = s.d_model, s.heads
    lang = plan["language"]
    enc_layer = enc_t * (ENCODER[lang] * d + FFN * s.ffn) + attn * h * enc_t**2
    dec_layer = dec_t * (DECODER[lang] * d + FFN * s.ffn) + CROSS_KV[lang] * enc_t * d
    # the decoder's self-attention has no padding mask (padded labels are masked in the loss): without attention
    # dropout SDPA runs its fused causal kernel on CPU too and keeps no heads x target² tensors (tiny model at 2,000
    # target tokens: measured/predicted 1.01 without the term, 0.28 with it; with dropout 0.1, 1.06 with it)
    self_attn = attn if s.attention_dropout > 0 else 0
    dec_layer += attn * h * dec_t * enc_t + self_attn * h * dec_t**2
    head = dec_t * s.vocab + 2 * enc_t * d  # logits kept by the loss; embeddings, masks
    projector = PROJECTOR * tokens[-1] * s.embed_dim[-1]
    adapted = plan["vision"] == "lora"
    block = VISION_BLOCK_LORA if adapted else VISION_BLOCK
    blocks = [block * n * c for n, c in zip(tokens, s.embed_dim, strict=True)]
    patch = 0 if adapted else tokens[0] * s.embed_dim[0] + 3 * shape.image_size**2
    patch += sum(VISION_PATCH * n * c for n, c in zip(tokens[1:], s.embed_dim[1:], strict=True))
    vision_trains = plan["vision"] != "frozen"
    if not checkpointing:
        kept = s.encoder_layers * enc_layer + s.decoder_layers * dec_layer + head + projector
        if vision_trains:
            kept += patch + sum(b * depth for b, depth in zip(blocks, s.depths, strict=True))
        return kept, 0.0
    # checkpointed: only layer inputs are kept; one layer's activations come back during its backward
    kept = s.encoder_layers * enc_t * d + s.decoder_layers * dec_t * d + enc_t * d + head + projector
    transient = max(enc_layer, dec_layer)
    if vision_trains:
        kept += patch + sum(n * c * depth for n, c, depth in zip(tokens, s.embed_dim, s.depths, strict=True))
        transient = max(transient, *blocks)
    return kept, transient


# ---------------------------------------------------------------------------------------------------------
# Peak memory of one training step

GIB = 1024**3
LOW_PRECISION_ACT = 2.1  # bytes per activation element under bf16/fp16 autocast: matmul outputs are 2 bytes,
# layer norms, softmax and the loss stay fp32 (autocast's fp32 list), dropout masks 1 byte. Measured on an
# H200 (benchmarks/memory_base_cuda.jsonl): the per-sample slope of 5 modes at batch 1 and 8 gives 1.6-2.3.
CPU_RUNTIME = 40e6  # measured: a tiny model's peak RSS minus its prediction, 34-47 MB over the ten tiny rows of
# every mode (oneDNN/OpenMP buffers, autograd engine: what the first training step adds to a process whatever the
# model size). The baseline is taken after the model code (transformers, peft) is imported: that was 125 MB more
# here before, when full mode counted transformers' ~120 MB of imports that lora's baseline (peft) already held.
CUDA_CONTEXT = 0.75 * GIB  # CUDA context + kernels + cuBLAS workspace, outside torch's allocator: measured
# 0.81 GB on an H200 (torch 2.11, CUDA 13), 0.94 GB with bitsandbytes' kernels loaded
CUDA_ALLOCATOR = 1.10  # caching-allocator reserve over the peak of live tensors: measured 1.01-1.17 on an H200
QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + double-quantised absmax per 64-block
HEADROOM = 0.95  # plan to use at most this share of the memory


@dataclass(frozen=True)
class GPU:
    label: str
    memory: float  # bytes the card reports
    bf16: bool


GPUS = {
    "t4": GPU("NVIDIA T4 16 GB", 15.0 * GIB, False),
    "l4": GPU("NVIDIA L4 24 GB", 22.5 * GIB, True),
    "a100-40": GPU("NVIDIA A100 40 GB", 39.5 * GIB, True),
    "a100-80": GPU("NVIDIA A100 80 GB", 79.2 * GIB, True),
    "h100": GPU("NVIDIA H100 80 GB", 79.2 * GIB, True),
}
MODES = tuple(TABLE)  # the modes table's names, in its order


@dataclass(frozen=True)
class Setting:
    mode: str = "full"
    batch: int = 1
    checkpointing: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed: fp32 master weights, low-precision activations)
    optim: str = "adamw"  # adamw | adamw8bit
    lora_r: int = 16
    lora_vision: bool = False  # adapter modes: adapters in the vision tower too (finetune --lora-vision)


@dataclass(frozen=True)
class Estimate:
    """Bytes of each part at the peak; ``peak`` is what the benchmark compares with a measurement."""

    weights: float
    grads: float
    optimizer: float
    activations: float  # kept + transient, for the whole batch
    per_sample: float
    fixed: float  # everything that does not grow with the batch
    overhead: float
    load: float  # peak while the model is loaded (qlora on CPU only; 0 elsewhere, where training peaks higher)
    peak: float  # max(training step, load)


def trained(s: Sizes, component: str, setting: str, lora_r: int) -> float:
    """Parameters of one component that get gradients and optimizer state under a modes-table setting."""
    if setting == "frozen":
        return 0
    if setting == "full":
        return {"vision": s.vision, "projector": s.projector, "language": s.language}[component]
    # lora: the adapter matrices around the targets PEFT wraps (adapters.LANGUAGE_TARGETS, VISION_TARGETS)
    return lora_r * sum(i + o for i, o in {"vision": s.vision_lora_targets, "language": s.lora_targets}[component])


def trainable(s: Sizes, mode: str, lora_r: int = 16, lora_vision: bool = False) -> float:
    """Trainable parameters: the sum of :func:`trained` over the mode's plan (full: ``s.total``)."""
    plan = mode_row(mode).plan(lora_vision)
    return sum(trained(s, name, setting, lora_r) for name, setting in plan.items())


def stored_weights(s: Sizes, row: TrainingMode) -> float:
    """Bytes of the base weights: fp32, or (``quant_bits``) every Linear outside the projector and the LM head
    quantised, vision tower included; only 4-bit NF4 has a measured size here."""
    if row.quant_bits is None:
        return 4.0 * s.total
    per_weight = {4: QUANT_BYTES}[row.quant_bits]
    return per_weight * s.linear + 4 * (s.total - s.linear)


def estimate(s: Sizes, setting: Setting, shape: Shape, device: str = "cpu") -> Estimate:
    mode = setting.mode
    row = mode_row(mode)  # an unknown mode is a ValueError
    plan = row.plan(setting.lora_vision)
    n_train = trainable(s, mode, setting.lora_r, setting.lora_vision)
    weights = stored_weights(s, row)
    if row.adapters:
        weights += 4 * n_train  # adapter matrices + the projector's trained copy, beside the base weights
    low = setting.precision in ("bf16", "fp16")
    if low:
        weights += 2 * n_train  # autocast caches a low-precision copy of each trainable weight per forward
    grads = 4.0 * n_train
    state = (2.0 if setting.optim.startswith(("adamw8bit", "paged")) else 8.0) * n_train
    step_temp = 0.0 if setting.optim != "adamw" else 4.0 * n_train  # foreach AdamW: one sqrt(v) temporary
    # gradients that already exist while the activations are still held: everything but the vision tower's
    # (the backward reaches the vision tower last)
    vision_grads = trained(s, "vision", plan["vision"], setting.lora_r)
    early_grads = 4.0 * (n_train - vision_grads)
    if plan["language"] == "full":  # tied LM head: its gradient is a second vocab × d matrix, summed
        early_grads += 4.0 * s.vocab * s.d_model  # into the embedding's during the backward
    kept, transient = activations(
        s, mode, shape, setting.checkpointing, fused_attention=device == "cuda", lora_vision=setting.lora_vision
    )
    act_bytes = LOW_PRECISION_ACT if low else 4.0
    per_sample = (kept + transient) * act_bytes
    fixed_fb = weights + state + early_grads
    fixed_step = weights + grads + state + step_temp
    live = max(fixed_fb + setting.batch * per_sample, fixed_step)
    overhead = CPU_RUNTIME
    load = 0.0
    if row.quant_bits is not None and device == "cpu":
        # from_pretrained memory-maps the checkpoint and quantising reads every Linear weight, so the whole file
        # is resident at once, next to the 4-bit weights and the unquantised weights that
        # adapters.own_unquantized_weights copies out of the mapping before it closes. At batch 1 this is the
        # peak of a qlora run (measured 1.25 GB for base, 3.80 GB for large; predicted 1.21 and 3.77). With the
        # file mapped for the whole run instead, its pages stayed resident next to their 4-bit copies: the
        # 0.7 GB that training used to show on top.
        # (On a GPU the file is host memory; unquantised, the mapped weights are the model's own weights.)
        load = s.stored * s.total + QUANT_BYTES * s.linear + s.stored * (s.total - s.linear)
    if device == "cuda":
        overhead = CUDA_CONTEXT + (CUDA_ALLOCATOR - 1) * live
        live *= CUDA_ALLOCATOR
    return Estimate(
        weights=weights, grads=grads, optimizer=state, activations=setting.batch * per_sample,
        per_sample=per_sample * (CUDA_ALLOCATOR if device == "cuda" else 1), fixed=max(fixed_fb, fixed_step),
        overhead=overhead, load=load, peak=max(live + (CUDA_CONTEXT if device == "cuda" else CPU_RUNTIME), load),
    )


# ---------------------------------------------------------------------------------------------------------
# The planner: largest batch that fits, and the setting `finetune --fit auto` picks


@dataclass(frozen=True)
class Fit:
    """What fits for one mode: the largest micro-batch without/with checkpointing, and the pick."""

    mode: str
    peak_1: float  # predicted peak at batch 1 without checkpointing
    max_batch: int  # largest micro-batch without checkpointing (0: not even 1 fits)
    max_batch_ckpt: int
    micro_batch: int  # picked; 0 when nothing fits
    grad_accum: int
    checkpointing: bool
    peak: float  # predicted peak of the pick

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0

    def describe(self) -> str:
        if not self.fits:
            return "does not fit, even with checkpointing at batch 1"
        ckpt = " + gradient checkpointing" if self.checkpointing else ""
        return f"batch {self.micro_batch} × accumulation {self.grad_accum}{ckpt}"


def largest_batch(s: Sizes, setting: Setting, shape: Shape, budget: float, device: str, limit: int = 4096) -> int:
    """Largest batch whose predicted peak stays under ``budget`` (0: not even 1); the peak grows with the batch."""

    def fits(batch: int) -> bool:
        return estimate(s, Setting(**{**setting.__dict__, "batch": batch}), shape, device).peak <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def fit(
    s: Sizes, base: Setting, shape: Shape, budget: float, device: str, effective_batch: int,
    force_checkpointing: bool = False,
) -> Fit:
    """Pick micro-batch × accumulation = ``effective_batch``; checkpointing only when batch 1 does not fit.

    The micro-batch is the largest divisor of the effective batch that fits, so the effective batch is
    exactly what was asked for. Checkpointing costs a second forward of every layer (~30 % more compute),
    so it is switched on only when no batch fits without it.
    """
    plain = Setting(**{**base.__dict__, "checkpointing": False, "batch": 1})
    ckpt = Setting(**{**base.__dict__, "checkpointing": True, "batch": 1})
    max_plain = largest_batch(s, plain, shape, budget, device)
    max_ckpt = largest_batch(s, ckpt, shape, budget, device)
    use_ckpt = (force_checkpointing or max_plain == 0) and max_ckpt > 0
    cap = max_ckpt if use_ckpt else max_plain
    micro = max((d for d in range(1, effective_batch + 1) if effective_batch % d == 0 and d <= cap), default=0)
    chosen = Setting(**{**base.__dict__, "checkpointing": use_ckpt, "batch": max(micro, 1)})
    return Fit(
        mode=base.mode, peak_1=estimate(s, plain, shape, device).peak, max_batch=max_plain, max_batch_ckpt=max_ckpt,
        micro_batch=micro, grad_accum=effective_batch // micro if micro else 0, checkpointing=use_ckpt,
        peak=estimate(s, chosen, shape, device).peak,
    )


def gpu_precision(gpu: GPU, requested: str = "auto") -> str:
    """bf16 where the card has it, fp16 on a T4 (no bf16); an explicit choice is kept."""
    if requested != "auto":
        return requested
    return "bf16" if gpu.bf16 else "fp16"


def default_optim(mode: str) -> str:
    """The optimizer the memory model assumes: 8-bit AdamW where the mode's row says so (paging adds nothing)."""
    return "adamw8bit" if mode_row(mode).optim_8bit else "adamw"


def model_image_size(model: str) -> int:
    """The processor's image side: 768 for base/large, 128 for tiny, else the folder's preprocessor config."""
    import json

    if model in BUILTIN:
        return IMAGE_SIZE
    if model == "tiny":
        from florence_kit.model.tiny import DEFAULT_IMAGE_SIZE

        return DEFAULT_IMAGE_SIZE
    folder = Path(model).expanduser()
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            size = data.get("image_processor", data).get("size") or {}
            side = (size.get("height") or size.get("shortest_edge")) if isinstance(size, dict) else size
            if side:
                return int(side)
    return IMAGE_SIZE


@dataclass(frozen=True)
class Budget:
    """Memory a run may use: ``device`` is cuda (a GPU's memory) or cpu (system RAM)."""

    label: str
    memory: float  # usable bytes (after the headroom)
    device: str
    precision: str


def gpu_budget(name: str, precision: str = "auto") -> Budget:
    gpu = GPUS[name]
    return Budget(gpu.label, gpu.memory * HEADROOM, "cuda", gpu_precision(gpu, precision))


def local_budget(precision: str | None = None) -> Budget:
    """This machine: the GPU's total memory when CUDA is there, else the RAM available now (MemAvailable)."""
    import torch

    if torch.cuda.is_available():
        _, total = torch.cuda.mem_get_info()
        bf16 = torch.cuda.is_bf16_supported()
        chosen = precision if precision and precision != "auto" else ("bf16" if bf16 else "fp16")
        return Budget(torch.cuda.get_device_name(), total * HEADROOM, "cuda", chosen)

    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    return Budget("CPU (available RAM)", available * HEADROOM, "cpu", "fp32")


def plan_modes(
    s: Sizes, shape: Shape, budget: Budget, effective_batch: int, modes: tuple[str, ...] = MODES, lora_r: int = 16,
    lora_vision: bool = False,
) -> list[Fit]:
    """One Fit per mode; ``lora_vision`` applies to the adapter modes (the others have no adapters)."""
    return [
        fit(s, Setting(mode, precision=budget.precision, optim=default_optim(mode), lora_r=lora_r,
                       lora_vision=lora_vision and mode_row(mode).adapters), shape,
            budget.memory, budget.device, effective_batch)
        for mode in modes
    ]


def text_lengths(processor: Any, rows: Any, limit: int = 1000) -> tuple[int, int]:
    """(longest prompt, longest target) in tokens over the first ``limit`` rows: the planner's text lengths."""
    from florence_kit.data.collate import encoder_length, target_length

    prompt = target = 1
    for n, (_, text, label) in enumerate(rows):
        if n >= limit:
            break
        prompt = max(prompt, encoder_length(processor, text) - processor.num_image_tokens - 2)
        target = max(target, target_length(processor, label) if label else 1)
    return prompt, target


@dataclass(frozen=True)
class FitRequest:
    """What ``--fit auto`` reads of a run's options (train/ builds it from its TrainConfig's same-named fields)."""

    mode: str
    batch_size: int  # the effective batch asked for is batch_size × grad_accum
    grad_accum: int
    precision: str  # auto | bf16 | fp16 | fp32 (--precision)
    optim: str | None  # None: the mode's default
    lora_r: int
    lora_vision: bool
    gradient_checkpointing: bool  # asked for: the pick keeps it on


def fit_auto(request: FitRequest, model: Any, processor: Any, rows: Any, print_fn: Any = print) -> Fit:
    """``finetune --fit auto``: the micro-batch, accumulation and checkpointing that fit this machine.

    The requested effective batch is ``--batch-size`` × ``--grad-accum``. On a GPU the budget is its total
    memory (torch.cuda.mem_get_info), on CPU the RAM available now (MemAvailable); 95 % of either is used.
    """
    from florence_kit.common.errors import UserError

    native = model.get_base_model() if hasattr(model, "get_base_model") else model
    s = sizes(native.config)
    budget = local_budget(request.precision)
    size = getattr(processor.image_processor, "size", None)  # a dict or transformers' SizeDict
    side = int(getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else 0) or IMAGE_SIZE)
    prompt, target = text_lengths(processor, rows)
    shape = Shape(side, prompt, target)
    optim = request.optim or default_optim(request.mode)
    optim = "adamw8bit" if "8bit" in optim else "adamw"
    setting = Setting(request.mode, precision=budget.precision, optim=optim, lora_r=request.lora_r,
                      lora_vision=request.lora_vision)
    effective = request.batch_size * request.grad_accum
    chosen = fit(s, setting, shape, budget.memory, budget.device, effective, request.gradient_checkpointing)
    where = f"{budget.label}, {budget.memory / GIB:.1f} GiB usable, {budget.precision}"
    if not chosen.fits:
        raise UserError(
            f"--fit auto: --mode {request.mode} does not fit {where} even at batch 1 with gradient checkpointing "
            f"(predicted {chosen.peak / GIB:.1f} GiB); use a lighter --mode (frozen-encoder, lora, qlora) "
            "or a machine with more memory"
        )
    print_fn(
        f"fit auto ({where}; {side}px, {prompt}+{target} text tokens): effective batch {effective} = "
        f"{chosen.describe()}, predicted peak {chosen.peak / GIB:.1f} GiB"
    )
    return chosen
