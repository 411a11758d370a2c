"""``--precision auto|bf16|fp16|fp32`` → Accelerate's ``mixed_precision`` setting.

The decision is a pure function of the device facts (:func:`resolve_precision`), so it is tested on a
machine without a GPU. Weights stay fp32 (the master copy); Accelerate autocasts the forward pass, and
for fp16 adds a loss scaler, because fp16 gradients underflow without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from florence_kit.common.errors import UserError


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


# our names → accelerate's ``mixed_precision`` values
ACCELERATE_NAME = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision decision depends on; :func:`device_facts` reads them from torch."""

    cuda: bool
    bf16: bool  # native bf16 tensor cores (compute capability >= 8.0: A100, H100, RTX 30xx+), not emulation
    name: str = "cpu"


def device_facts() -> DeviceFacts:
    import torch

    if not torch.cuda.is_available():
        return DeviceFacts(cuda=False, bf16=False)
    # torch.cuda.is_bf16_supported() also answers True on a T4 (sm_75), where bf16 is emulated and slow;
    # the compute capability is the fact that matters.
    major, _ = torch.cuda.get_device_capability()
    return DeviceFacts(cuda=True, bf16=major >= 8, name=torch.cuda.get_device_name())


def resolve_precision(requested: str, facts: DeviceFacts) -> str:
    """Our precision name (``bf16``/``fp16``/``fp32``) for this device; a combination it cannot run is a UserError.

    ``auto``: bf16 on GPUs with native bf16, fp16 with loss scaling on older ones (T4, V100), fp32 on CPU.
    """
    if requested not in {p.value for p in Precision}:
        raise UserError(f"--precision must be one of auto, bf16, fp16, fp32; got '{requested}'")
    if requested == "auto":
        if not facts.cuda:
            return "fp32"
        return "bf16" if facts.bf16 else "fp16"
    if requested == "fp16" and not facts.cuda:
        raise UserError("--precision fp16 needs a CUDA GPU (fp16 autocast and loss scaling); use fp32 or bf16 on CPU")
    return requested
