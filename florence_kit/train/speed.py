"""``--speed auto``: the plain ``finetune`` command takes the fast path by itself, and says what it chose.

Three switches make a run fast without changing what it computes (florence_kit/data/prepared.py,
florence_kit/train/feature_cache.py):

- ``prepare_data``: decode and resize each distinct page once into a uint8 store on disk (the same batches, bit
  for bit, as the per-batch path);
- ``cache_vision_features``: with the vision tower frozen, run it once per page and read its output back;
- ``group_by_image``: a page's questions in one batch, so that the tower runs once per page in the first epoch too.

Each is ``None`` until decided here (``True``/``False`` when typed: ``--prepare-data``/``--no-prepare-data``).
``--speed auto`` turns on what can serve: the store for map-style data when it fits the disk budget, the cache
and the grouping where the vision tower is frozen and they fit too; streamed data and a disk without room keep the
plain per-batch path. ``--speed off`` keeps the plain path for every switch not typed. The budget is half of the
free space of the filesystem each store goes to, estimated before anything is written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError

SPEEDS = ("auto", "off")
SWITCHES = ("prepare_data", "cache_vision_features", "group_by_image")
DISK_SHARE = 0.5  # at most this share of a filesystem's free space goes to the stores
FEATURE_BYTES = 2  # the feature cache keeps fp16


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def existing(path: Path) -> Path:
    """``path`` or its nearest existing parent: where a folder not created yet will live."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing(path)).free


def filesystem(path: Path) -> int:
    return os.stat(existing(path)).st_dev


def feature_bytes_per_page(model: Any, height: int, width: int) -> int:
    """Bytes of one cache entry: the tower's last stage (channels × H/stride × W/stride), fp16."""
    native = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = native.config.vision_config
    stride = 1
    for s in vision.patch_stride:
        stride *= s
    return int(vision.embed_dim[-1] * -(-height // stride) * -(-width // stride) * FEATURE_BYTES)


def store_dirs(cfg: Any) -> tuple[Path, Path]:
    out = Path(cfg.output_dir)
    return Path(cfg.prepare_dir or out / "prepared"), Path(cfg.vision_cache_dir or out / "vision_cache")


def recorded(cfg: Any, checkpoint: Path) -> dict[str, bool] | None:
    """The switches the interrupted run chose (``<run>/checkpoints/step-N``); None where it recorded none.

    Page grouping comes from the checkpoint's own fingerprint (``data_order``: the batch order a resume must
    keep); the store and the cache, which leave the order alone, from the run's config.yaml.
    """
    import json

    from florence_kit.train.checkpoints import STATE_FILE
    from florence_kit.train.runfolder import RunFolder

    data = RunFolder.of_checkpoint(checkpoint).config()
    if not all(isinstance(data.get(k), bool) for k in SWITCHES):
        return None
    state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    return {**{k: data[k] for k in SWITCHES},
            "group_by_image": state.get("fingerprint", {}).get("data_order") == "image"}


def decide(
    cfg: Any,
    *,
    frozen_vision: bool,
    pages: Callable[[], int],
    pixel_size: tuple[int, int],
    feature_page_bytes: int,
    resumed: dict[str, bool] | None = None,
    free: Callable[[Path], int] | None = None,
    device_of: Callable[[Path], int] | None = None,
    no_cache: str | None = None,
) -> tuple[Any, str, dict[str, Any]]:
    """(``cfg`` with every switch True/False, the one line to print, the record for config.yaml).

    ``pages()`` counts the distinct training images (called only when a store is considered). ``resumed``: the
    switches the interrupted run chose, kept so that ``--resume`` deals the same batches. ``free(path)`` and
    ``device_of(path)``: the free bytes and the filesystem where ``path`` goes (default: this machine's).
    ``no_cache``: why the feature cache cannot run here even with a frozen tower (said in the line).
    """
    free = free or free_bytes
    device_of = device_of or filesystem
    if cfg.speed not in SPEEDS:
        raise UserError(f"--speed must be one of {', '.join(SPEEDS)}, got '{cfg.speed}'")
    asked = {k: getattr(cfg, k) for k in SWITCHES}
    if cfg.group_by_length and asked["prepare_data"] is None:  # its lengths come from the store's tokenisation
        asked["prepare_data"] = True
    open_ = [k for k, v in asked.items() if v is None]
    record: dict[str, Any] = {"speed": cfg.speed}
    if resumed is not None and open_:
        chosen = {k: (resumed[k] if v is None else bool(v)) for k, v in asked.items()}
        line = f"speed {cfg.speed}: resuming, so as the run chose: {describe(chosen)} (not re-decided)"
        return replace(cfg, **chosen), line, {**record, "decision": line}
    if cfg.speed == "off" or not open_:
        chosen = {k: bool(v) for k, v in asked.items()}
        why = "--speed off" if cfg.speed == "off" else "every switch typed"
        line = f"speed {cfg.speed}: {describe(chosen)} ({why})"
        return replace(cfg, **chosen), line, {**record, "decision": line}
    chosen = dict(asked)
    reasons = []
    store_dir, cache_dir = store_dirs(cfg)
    if cfg.streaming:
        chosen = {k: bool(v) for k, v in asked.items()}
        reasons.append("the data is streamed (--streaming): nothing is stored")
    else:
        n = pages()
        h, w = pixel_size
        store = n * 3 * h * w
        features = n * feature_page_bytes if frozen_vision else 0
        record.update(pages=n, store_bytes=store, feature_bytes=features)
        used: dict[int, int] = {}  # bytes planned per filesystem

        def room(path: Path, need: int) -> bool:
            dev = device_of(path)
            if used.get(dev, 0) + need > DISK_SHARE * free(path):
                return False
            used[dev] = used.get(dev, 0) + need
            return True

        if asked["prepare_data"] is None:
            chosen["prepare_data"] = room(store_dir, store)
            if chosen["prepare_data"]:
                reasons.append(f"{n} pages at {h}x{w} decoded once: {size(store)} in {store_dir}")
            else:
                reasons.append(f"no room for the decode-once store ({size(store)} is more than half the "
                               f"{size(free(store_dir))} free in {existing(store_dir)}; --prepare-dir elsewhere)")
        elif asked["prepare_data"]:
            used[device_of(store_dir)] = store
        if asked["cache_vision_features"] is None:
            if no_cache:
                chosen["cache_vision_features"] = False
                reasons.append(f"no feature cache: {no_cache}")
            elif not frozen_vision:
                chosen["cache_vision_features"] = False
                vision = " --lora-vision" if getattr(cfg, "lora_vision", False) else ""
                reasons.append(f"no feature cache: --mode {cfg.mode}{vision} trains the vision tower")
            elif room(cache_dir, features):
                chosen["cache_vision_features"] = True
                reasons.append(f"frozen vision tower: features cached once per page ({size(features)} in {cache_dir})")
            else:
                chosen["cache_vision_features"] = False
                reasons.append(f"no room for the feature cache ({size(features)}, more than half the "
                               f"{size(free(cache_dir))} free; --vision-cache-dir elsewhere)")
        if asked["group_by_image"] is None:  # grouping pays where the cache runs the tower once per page
            chosen["group_by_image"] = bool(chosen["cache_vision_features"]) and not cfg.group_by_length
    chosen = {k: bool(v) for k, v in chosen.items()}
    typed = [flag(k, v) for k, v in asked.items() if v is not None]
    line = (f"speed auto: {describe(chosen)}; " + "; ".join(reasons)
            + (f"; as typed: {' '.join(typed)}" if typed else "") + " (--speed off: the plain path)")
    return replace(cfg, **chosen), line, {**record, "decision": line}


def flag(key: str, value: bool) -> str:
    return f"--{'' if value else 'no-'}{key.replace('_', '-')}"


def describe(chosen: dict[str, bool]) -> str:
    parts = [name for key, name in (("prepare_data", "decode-once store"), ("cache_vision_features",
             "vision-feature cache"), ("group_by_image", "page grouping")) if chosen[key]]
    return " + ".join(parts) if parts else "plain per-batch path"
