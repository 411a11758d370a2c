"""Images/s of ``florence-kit predict`` over a folder vs the model card's loop (one image at a time).

    python -m benchmarks.predict_speed                         # tiny model, 128 px, 128 images
    python -m benchmarks.predict_speed --model base --n 16     # base-sized random model at 768 px
    python -m benchmarks.predict_speed --model base --onnx     # also predict on ONNX exports (fp32 and int8)
    python -m benchmarks.predict_speed --model base --profile  # where the time goes (stages, FLOPs, matmul rate)

The card's loop is the one Microsoft's model card shows: for each image, the processor on that image and prompt,
then ``model.generate(input_ids=..., pixel_values=..., ...)`` and a decode. ``predict`` runs over the same folder
with the same model (saved to disk and loaded by the command, load time included in its rate; the card's loop is
timed without its load), same task prompt and generation settings; the answers must be equal (asserted). With
``--onnx`` the model is exported as a user would (``florence-kit export --onnx``, once with ``--quantize none`` and
once with ``--quantize int8``) and ``predict`` runs on each export: the fp32 graphs' answers are asserted equal to
PyTorch's, int8 weights change some answers (the agreement is printed). The sides run in ``--rounds`` interleaved
rounds (card, predict, ONNX fp32, ONNX int8, card, ...) and each rate is the median round's, so load from other
jobs on a shared machine falls on every side alike. The models are random (no weights can be downloaded here):
cross-attention is scaled up 3x so answers depend on the image, and answers run to ``--max-new-tokens``, the same
work on both sides. On a GPU both sides run on it (``predict`` puts the model there itself).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MODELS = {"tiny": 128, "base": 768}  # name: image size


def build_model(name: str, seed: int = 0, cross_attention_scale: float = 3.0, plain: bool = False):
    """A random Florence-2 (tiny, or base-sized from the built-in config) whose answers depend on the image (its
    cross-attention output scaled up ``cross_attention_scale`` times); ``plain``: as its constructor initialises it
    (the base-sized model's export passes its 1e-4 logits check only so)."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.memory import builtin_config
    from florence_kit.model.tiny import IMAGE_TOKEN_ID, VOCAB_SIZE, build_processor, reinit_default, tiny_config

    size = MODELS[name]
    processor = build_processor(size)
    config = tiny_config(VOCAB_SIZE, size) if name == "tiny" else builtin_config(name)
    config.image_token_id = IMAGE_TOKEN_ID  # the token florence-kit's offline processor writes for <image>
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    if plain:
        return model.eval(), processor
    reinit_default(model)
    model.tie_weights()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "encoder_attn.out_proj" in param_name:
                param.mul_(cross_attention_scale)
    return model.eval(), processor


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` photos-like images of varied sizes (smooth colour fields with noise), some in a nested folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / ("nested" if i % 4 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(240, 720)), int(rng.integers(320, 960))
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        noise = rng.integers(-20, 20, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        path = sub / f"img{i:04d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return sorted(paths, key=str)


def card_loop(model, processor, paths: list[Path], prompt: str, max_new_tokens: int, num_beams: int) -> list[str]:
    """The model card's code, one image at a time (answers decoded with their <loc_*> tokens, as predict keeps)."""
    import torch
    from PIL import Image

    from florence_kit.common.geometry import decode_answers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    answers = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=prompt, images=image, return_tensors="pt").to(device)
        with torch.inference_mode():
            generated_ids = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                           max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        answers.append(decode_answers(processor, generated_ids)[0])
    return answers


def run_predict(model_dir: Path, folder: Path, out: Path, task: str, args: argparse.Namespace) -> tuple[float, list]:
    """``florence-kit predict FOLDER --output OUT`` in this process: (seconds, records)."""
    from typer.testing import CliRunner

    from florence_kit.cli import app

    command = ["predict", str(folder), "--task", task, "--model", str(model_dir), "--output", str(out),
               "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
               "--max-new-tokens", str(args.max_new_tokens), "--num-beams", str(args.num_beams), "--quiet"]
    start = time.perf_counter()
    result = CliRunner().invoke(app, command)
    seconds = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"predict failed: {result.output}")
    return seconds, [json.loads(line) for line in out.read_text().splitlines()]


def export(model_dir: Path, out: Path, quantize: str) -> None:
    """``florence-kit export MODEL --onnx OUT --quantize Q``, as a user runs it."""
    from typer.testing import CliRunner

    from florence_kit.cli import app

    result = CliRunner().invoke(app, ["export", str(model_dir), "--onnx", str(out), "--quantize", quantize])
    if result.exit_code != 0:
        raise SystemExit(f"export --quantize {quantize} failed: {result.output}")


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--n", type=int, default=128, help="images in the folder")
    parser.add_argument("--task", default="caption")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each rate is the median round's")
    parser.add_argument("--onnx", action="store_true", help="also export fp32 and int8 and run predict on each")
    parser.add_argument("--profile", action="store_true", help="print where the time goes instead (see profile())")
    parser.add_argument("--cross-attention-scale", type=float, default=3.0,
                        help="scale of the random model's cross-attention (1: as initialised)")
    parser.add_argument("--plain-init", action="store_true",
                        help="the random model as its constructor initialises it: the base-sized model's ONNX export "
                        "passes its 1e-4 logits check only so (its answers depend little on the image)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    import torch

    from florence_kit.tasks.registry import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        from benchmarks.predict_profile import profile

        rows = profile(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    prompt = get_task(args.task).prompt
    rows: dict[str, float | int | str] = {"model": args.model, "images": args.n, "task": args.task,
                                          "device": "cuda" if torch.cuda.is_available() else "cpu",
                                          "threads": torch.get_num_threads(), "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, processor = build_model(args.model, cross_attention_scale=args.cross_attention_scale,
                                       plain=args.plain_init)
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        paths = make_images(tmp / "images", args.n)
        sides = {"predict": tmp / "model"}
        if args.onnx:
            export(tmp / "model", tmp / "onnx-fp32", "none")
            export(tmp / "model", tmp / "onnx-int8", "int8")
            sides.update(onnx_fp32=tmp / "onnx-fp32", onnx_int8=tmp / "onnx-int8")

        card_loop(model, processor, paths[:2], prompt, args.max_new_tokens, args.num_beams)  # warm-up
        seconds: dict[str, list[float]] = {"card": [], **{side: [] for side in sides}}
        answers: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            start = time.perf_counter()
            answers["card"] = card_loop(model, processor, paths, prompt, args.max_new_tokens, args.num_beams)
            seconds["card"].append(time.perf_counter() - start)
            for side, model_dir in sides.items():
                out = tmp / f"{side}.jsonl"
                out.unlink(missing_ok=True)
                took, records = run_predict(model_dir, tmp / "images", out, args.task, args)
                assert [r["path"] for r in records] == [str(p) for p in paths], "predict's order is not the folder's"
                seconds[side].append(took)
                answers[side] = [r["text"] for r in records]
        del model
        card = answers["card"]
        for side in ("predict", "onnx_fp32"):  # the same graphs in float32: the same answers
            if side in answers:
                differ = sum(a != b for a, b in zip(answers[side], card, strict=True))
                assert differ == 0, f"{differ} of {len(card)} answers differ between {side} and the card's loop"
        card_s = median(seconds["card"])
        rows.update(card_images_per_s=args.n / card_s)
        print(f"card loop (one image at a time): {args.n / card_s:8.2f} images/s")
        names = {"predict": "florence-kit predict (PyTorch)", "onnx_fp32": "predict, ONNX fp32 export",
                 "onnx_int8": "predict, ONNX int8 export"}
        for side in sides:
            side_s = median(seconds[side])
            same = sum(a == b for a, b in zip(answers[side], card, strict=True))
            key = "predict" if side == "predict" else side
            rows.update({f"{key}_images_per_s": args.n / side_s, f"{key}_ratio": card_s / side_s,
                         f"{key}_same_answers": same})
            print(f"{names[side] + ':':32} {args.n / side_s:8.2f} images/s  {card_s / side_s:5.2f}x  "
                  f"({same}/{args.n} answers as the card's)")
        rows["ratio"] = rows.pop("predict_ratio")
        rows["seconds"] = seconds  # every round of every side
    print(f"({rows['device']}, torch {torch.__version__}, {rows['threads']} thread(s), batch {args.batch_size}, "
          f"{args.num_workers} worker(s), {args.max_new_tokens} new tokens, median of {args.rounds} interleaved "
          "round(s))")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
