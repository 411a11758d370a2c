"""Images/s of ``florence-kit predict`` over a folder vs the model card's loop (one image at a time).

    python -m benchmarks.predict_speed                       # tiny model, 128 px, 128 images
    python -m benchmarks.predict_speed --model base          # base-sized random model at 768 px
    python -m benchmarks.predict_speed --model base --onnx   # also the int8 ONNX export through predict

The card's loop is the one Microsoft's model card shows: for each image, the processor on that image and prompt,
then ``model.generate(input_ids=..., pixel_values=..., ...)`` and a decode. ``predict`` runs over the same folder
with the same model (saved to disk and loaded by the command, load time included in its rate; the card's loop is
timed without its load), same task prompt and generation settings; the answers must be equal (asserted). The ONNX
int8 export's answers are compared too but not asserted: int8 weights change some of them (the agreement is
printed). The models are random (no weights can be downloaded here): cross-attention is scaled up 3x so answers
depend on the image, and answers run to ``--max-new-tokens``, the same work on both sides. On a GPU both sides run
on it (``predict`` puts the model there itself). On a shared CPU wall-clock rates swing with the other load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MODELS = {"tiny": 128, "base": 768}  # name: image size


def build_model(name: str, seed: int = 0):
    """A random Florence-2 (tiny, or base-sized from the built-in config) whose answers depend on the image."""
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
    reinit_default(model)
    model.tie_weights()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "encoder_attn.out_proj" in param_name:
                param.mul_(3.0)
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
    parser.add_argument("--onnx", action="store_true", help="also export --quantize int8 and run predict on it")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    import torch

    from florence_kit.tasks.registry import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = get_task(args.task).prompt
    rows: dict[str, float | int | str] = {"model": args.model, "images": args.n, "task": args.task,
                                          "device": "cuda" if torch.cuda.is_available() else "cpu",
                                          "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, processor = build_model(args.model)
        model.save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        paths = make_images(tmp / "images", args.n)

        card_loop(model, processor, paths[:2], prompt, args.max_new_tokens, args.num_beams)  # warm-up
        start = time.perf_counter()
        card = card_loop(model, processor, paths, prompt, args.max_new_tokens, args.num_beams)
        card_s = time.perf_counter() - start
        del model
        predict_s, records = run_predict(tmp / "model", tmp / "images", tmp / "out.jsonl", args.task, args)
        assert [r["path"] for r in records] == [str(p) for p in paths], "predict's order is not the folder's"
        differ = sum(r["text"] != a for r, a in zip(records, card, strict=True))
        assert differ == 0, f"{differ} of {len(card)} answers differ between predict and the card's loop"
        rows.update(card_images_per_s=args.n / card_s, predict_images_per_s=args.n / predict_s,
                    ratio=card_s / predict_s)
        print(f"card loop (one image at a time): {args.n / card_s:8.2f} images/s")
        print(f"florence-kit predict:            {args.n / predict_s:8.2f} images/s  "
              f"{card_s / predict_s:5.2f}x  (same {args.n} answers)")
        if args.onnx:
            from typer.testing import CliRunner

            from florence_kit.cli import app

            export = CliRunner().invoke(app, ["export", str(tmp / "model"), "--onnx", str(tmp / "onnx"),
                                              "--quantize", "int8"])
            if export.exit_code != 0:
                raise SystemExit(f"export failed: {export.output}")
            onnx_s, onnx_records = run_predict(tmp / "onnx", tmp / "images", tmp / "onnx.jsonl", args.task, args)
            same = sum(r["text"] == a for r, a in zip(onnx_records, card, strict=True))
            rows.update(onnx_int8_images_per_s=args.n / onnx_s, onnx_int8_ratio=card_s / onnx_s,
                        onnx_int8_same_answers=same)
            print(f"predict, ONNX int8 export:       {args.n / onnx_s:8.2f} images/s  {card_s / onnx_s:5.2f}x  "
                  f"({same}/{args.n} answers as fp32)")
    print(f"({rows['device']}, torch {torch.__version__}, {rows['threads']} thread(s), batch {args.batch_size}, "
          f"{args.num_workers} worker(s), {args.max_new_tokens} new tokens)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
