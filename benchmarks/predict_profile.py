"""Where an image's time goes: the model card's loop vs ``predict``'s engine, stage by stage, against the FLOPs.

    python -m benchmarks.predict_speed --model base --n 8 --profile --rounds 3

Both sides run in this process on the same model and images, in interleaved rounds (card, engine, card, ...), and
each figure is the median round's. Forward hooks time the vision tower (with its projector), the BART encoder, the
decoder (every generated token is one decoder call) and the LM head; the processor (image decode, resize,
tokenise) is timed around its calls; what is left is ``generate``'s own work (search, stopping, cache handling).
The engine is :func:`florence_kit.evaluate.batch.answer_requests` with no worker processes (so its processor time
shows; ``predict --num-workers 1`` moves it to a worker). The answers are asserted equal. FLOPs are counted by
``torch.utils.flop_counter`` for one image, and the machine's float32 matrix-product rate is measured on a 2048²
product with the same threads: FLOPs / that rate is how long the arithmetic takes at best.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = ("processor", "vision", "encoder", "decoder", "lm_head")


class StageTimer:
    """Seconds spent in each stage's modules (forward hooks), and the decoder's call count."""

    def __init__(self, model: Any) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)
        native = model.model
        modules = {"vision": [native.vision_tower, native.multi_modal_projector],
                   "encoder": [native.language_model.encoder], "decoder": [native.language_model.decoder],
                   "lm_head": [model.lm_head]}
        self.started: dict[str, float] = {}
        for stage, group in modules.items():
            for module in group:
                module.register_forward_pre_hook(lambda *_, stage=stage: self._start(stage))
                module.register_forward_hook(lambda *_, stage=stage: self._stop(stage))

    def _start(self, stage: str) -> None:
        self.started[stage] = time.perf_counter()

    def _stop(self, stage: str) -> None:
        self.seconds[stage] += time.perf_counter() - self.started.pop(stage)
        self.calls[stage] += 1

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.calls = dict.fromkeys(STAGES, 0)

    def timed(self, stage: str, call: Any) -> Any:
        """``call`` wrapped so its time counts to ``stage``."""

        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        return run


def matmul_rate(threads: int) -> float:
    """float32 GFLOP/s of a 2048x2048 matrix product on ``threads`` threads (median of 7)."""
    import statistics

    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def count_flops(model: Any, processor: Any, image: Any, prompt: str, max_new_tokens: int) -> dict[str, float]:
    """GFLOPs of one image: the vision tower, and the card's whole ``generate`` (vision, encoder, every step)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    inputs = processor(text=prompt, images=image, return_tensors="pt")
    with torch.inference_mode():
        with FlopCounterMode(display=False) as vision:
            model.model.get_image_features(inputs["pixel_values"])
        with FlopCounterMode(display=False) as whole:
            model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                           max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return {"vision_gflop": vision.get_total_flops() / 1e9, "image_gflop": whole.get_total_flops() / 1e9}


def profile(args: argparse.Namespace) -> dict[str, Any]:
    import statistics

    import torch
    from PIL import Image

    import florence_kit.evaluate.batch as batch
    from benchmarks.predict_speed import build_model, card_loop, make_images
    from florence_kit.evaluate.batch import ImageRef, Request, answer_requests
    from florence_kit.evaluate.generation import generation_config_for
    from florence_kit.tasks.registry import get_task

    spec = get_task(args.task)
    model, processor = build_model(args.model, cross_attention_scale=args.cross_attention_scale,
                                   plain=args.plain_init)
    timer = StageTimer(model)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp_name:
        paths = make_images(Path(tmp_name), args.n)
        gen_config = generation_config_for(spec, model, processor, num_beams=args.num_beams,
                                           max_new_tokens=args.max_new_tokens)
        requests = [Request(i, ImageRef(str(p), path=str(p)), spec.prompt) for i, p in enumerate(paths)]
        card_processor = timed_processor(processor, timer)
        collate = batch._Collator.__call__
        batch._Collator.__call__ = timer.timed("processor", collate)  # image open, resize and tokenise
        rounds: dict[str, list[dict[str, float]]] = {"card": [], "predict": []}
        try:
            card_loop(model, processor, paths[:1], spec.prompt, args.max_new_tokens, args.num_beams)  # warm-up
            for _ in range(args.rounds):
                timer.reset()
                start = time.perf_counter()
                card = card_loop(model, card_processor, paths, spec.prompt, args.max_new_tokens, args.num_beams)
                rounds["card"].append({"total": time.perf_counter() - start, **timer.seconds,
                                       "decoder_calls": timer.calls["decoder"]})
                timer.reset()
                start = time.perf_counter()
                answers: dict[int, str] = {}
                for results in answer_requests(model, processor, spec, requests, gen_config,
                                               batch_size=args.batch_size, num_workers=0):
                    answers.update((r.index, r.text) for r in results)
                rounds["predict"].append({"total": time.perf_counter() - start, **timer.seconds,
                                          "decoder_calls": timer.calls["decoder"]})
                assert [answers[i] for i in range(len(paths))] == card, "the engine's answers differ from the card's"
        finally:
            batch._Collator.__call__ = collate
        image = Image.open(paths[0]).convert("RGB")
        flops = count_flops(model, processor, image, spec.prompt, args.max_new_tokens)
    rate = matmul_rate(threads)
    rows: dict[str, Any] = {"model": args.model, "images": args.n, "threads": threads, "rounds": args.rounds,
                            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                            "matmul_gflops_per_s": rate, **flops}
    print(f"seconds per image, median of {args.rounds} interleaved round(s), {args.n} images, {threads} thread(s), "
          f"batch {args.batch_size}, {args.max_new_tokens} new tokens")
    print(f"{'stage':24} {'card loop':>10} {'engine':>10}")
    for stage in ("total", *STAGES, "generate (rest)", "decoder_calls"):
        values = []
        for side in ("card", "predict"):
            per_round = []
            for r in rounds[side]:
                value = r["total"] - sum(r[s] for s in STAGES) if stage == "generate (rest)" else r[stage]
                per_round.append(value if stage == "decoder_calls" else value / args.n)
            values.append(statistics.median(per_round))
            rows[f"{side}_{stage}"] = values[-1]
        shown = "{:10.0f}" if stage == "decoder_calls" else "{:10.3f}"
        print(f"{stage:24} " + " ".join(shown.format(v) for v in values))
    vision_floor = flops["vision_gflop"] / rate
    print(f"vision tower: {flops['vision_gflop']:.2f} GFLOP an image of {flops['image_gflop']:.2f} for the whole "
          f"answer; float32 matmul {rate:.0f} GFLOP/s on {threads} thread(s): at best {vision_floor:.2f} s an image "
          f"in the vision tower, {flops['image_gflop'] / rate:.2f} s in all")
    rows.update(vision_floor_s=vision_floor, rounds_seconds=rounds)
    return rows


def timed_processor(processor: Any, timer: StageTimer) -> Any:
    """The processor with its calls timed as the processor stage (the card's loop calls it once per image)."""

    class Timed:
        def __getattr__(self, name: str) -> Any:
            return getattr(processor, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return timer.timed("processor", processor)(*args, **kwargs)

    return Timed()
