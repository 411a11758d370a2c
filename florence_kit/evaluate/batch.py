"""The batch engine: many (image, prompt) requests → answers, with the device kept busy.

Images are opened, decoded and resized in DataLoader workers; requests are ordered by image then by prompt length
(:func:`florence_kit.evaluate.generation.page_order`), so a batch pads little and holds each image's prompts
together, and the vision tower runs once per distinct image of a batch (:func:`encode_pages`). An ONNX export runs
whole graphs, so there each row carries its own image (:func:`encode`). An image that cannot be read (missing,
zero bytes, truncated, not an image, a decompression bomb) never stops a run: its requests come back as
:class:`Unreadable` with the reason. Answers come back in the order batches finish; callers put them in order.

This is a library call with no CLI in it, the one engine every caller shares: ``predict`` writes what it yields into
shards, eval scores it (:func:`florence_kit.evaluate.scoring.answer_and_score`), a server answers with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.evaluate.generation import (
    encode,
    encode_pages,
    generate_from_inputs,
    generate_pages,
    page_order,
    prompt_lengths,
)
from florence_kit.tasks.spec import TaskSpec

THUMBNAIL_SIZE = 256  # longest side in pixels of the per-example JPEGs eval keeps for the report


@dataclass(frozen=True)
class ImageRef:
    """Where one image comes from, small enough to send to a worker: a file, or a row of ``rows`` (a dataset)."""

    key: str  # what identifies the input in the output: the path as found, or the dataset row number
    path: str | None = None
    row: int | None = None
    page: str | None = None  # inputs with the same page show the same image (default: the key)

    @property
    def image_key(self) -> str:
        return self.page or self.key


@dataclass(frozen=True)
class Request:
    """One question about one image; ``index`` is the caller's own number for it."""

    index: int
    image: ImageRef
    prompt: str
    box: str | None = None  # x1,y1,x2,y2 in pixels: written into the prompt's {region} once the image's size is known


@dataclass
class Answer:
    index: int
    width: int
    height: int
    text: str  # the raw answer, <loc_*> tokens kept
    parsed: Any  # the task's own structure: the text, or bboxes/labels, polygons, quad_boxes in pixels
    thumbnail: bytes | None = None  # a small JPEG of the image, where asked for (``thumbnail_size``)
    prompt: str | None = None  # the prompt as asked, where the request's box was written into it


@dataclass
class Unreadable:
    index: int
    reason: str


@dataclass
class _Batch:
    requests: list[Request]
    sizes: list[tuple[int, int]]
    bad: list[Unreadable] = field(default_factory=list)
    inputs: Any = None
    thumbnails: list[bytes] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


def open_image(ref: ImageRef, rows: Any = None, column: str = "image") -> Any:
    """An upright RGB image, as ``datasets`` decodes the images eval and finetune see; any failure raises.

    A decompression bomb (more pixels than PIL's ``MAX_IMAGE_PIXELS``) is refused before its pixels are read.
    """
    from PIL import Image, ImageOps

    from florence_kit.data.dataset import to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if ref.path is not None:
            with Image.open(ref.path) as handle:
                return to_rgb(ImageOps.exif_transpose(handle))
        value = rows[int(ref.row)][column]
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, dict):  # an undecoded datasets.Image: {"bytes", "path"}
            import io

            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        if not isinstance(value, Image.Image):
            raise ValueError(f"column '{column}' holds no image ({type(value).__name__})")
        return to_rgb(ImageOps.exif_transpose(value))


def thumbnail_jpeg(image: Any, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small JPEG of ``image`` (longest side ``size``): enough to recognise the page in a report."""
    import io

    small = image.convert("RGB")
    small.thumbnail((size, size))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UserError):  # already a sentence for the user (a dataset's "row N: image cannot be read")
        return str(exc)
    import re

    # an object's address ("<_io.BytesIO object at 0x7f...>") differs from run to run: the sidecar should not
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(exc).split())) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


class _Collator:
    """Requests → a :class:`_Batch`; runs in the workers, so opening and resizing overlap generation."""

    def __init__(self, processor: Any, rows: Any, column: str, by_page: bool,
                 opener: Callable[[ImageRef], Any] | None = None, thumbnail_size: int | None = None) -> None:
        self.processor, self.rows, self.column, self.by_page = processor, rows, column, by_page
        self.opener, self.thumbnail_size = opener, thumbnail_size

    def __call__(self, requests: list[Request]) -> _Batch:
        images: dict[str, Any] = {}
        bad: dict[str, str] = {}
        for request in requests:
            ref = request.image
            if ref.image_key in images or ref.image_key in bad:
                continue
            try:
                images[ref.image_key] = self.opener(ref) if self.opener else open_image(ref, self.rows, self.column)
            except Exception as exc:  # anything a broken file can raise: counted, never fatal
                bad[ref.image_key] = _reason(exc)
        prompts: dict[int, str] = {}
        for request in requests:
            if request.image.image_key in images:
                try:
                    prompts[request.index] = _with_box(request, images[request.image.image_key].size)
                except UserError as exc:  # a box that is not four numbers, has no area, lies outside its image
                    bad[f"box {request.index}"] = str(exc)
        good = [r for r in requests if r.index in prompts]
        batch = _Batch(good, [images[r.image.image_key].size for r in good],
                       [Unreadable(r.index, bad.get(r.image.image_key) or bad[f"box {r.index}"])
                        for r in requests if r.index not in prompts])
        batch.prompts = [prompts[r.index] for r in good]
        if not good:
            return batch
        if self.thumbnail_size:
            thumbs = {key: thumbnail_jpeg(image, self.thumbnail_size) for key, image in images.items()}
            batch.thumbnails = [thumbs[r.image.image_key] for r in good]
        prompts = batch.prompts
        if self.by_page:
            slot: dict[str, int] = {}
            index = [slot.setdefault(r.image.image_key, len(slot)) for r in good]
            batch.inputs = encode_pages(self.processor, [images[k] for k in slot], prompts, index)
        else:
            batch.inputs = encode(self.processor, [images[r.image.image_key] for r in good], prompts)
        return batch


def _with_box(request: Request, size: tuple[int, int]) -> str:
    """The request's prompt with its box, in pixels of the image, written into ``{region}`` as ``<loc_*>`` tokens."""
    if request.box is None:
        return request.prompt
    if not request.box.strip():
        raise UserError("no box given: the task asks about a region (x1,y1,x2,y2 in pixels of the image)")
    from florence_kit.common.geometry import box_prompt
    from florence_kit.evaluate.region_answers import parse_box_text

    return request.prompt.replace("{region}", box_prompt(parse_box_text(request.box, size, "box"), size))


def runs_pages(model: Any) -> bool:
    """Whether ``model`` can run its vision tower apart (once per image for several prompts); an ONNX export runs
    whole graphs, so each row carries its own image there."""
    native = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(getattr(native, "model", None), "get_image_features")


def answer_requests(model: Any, processor: Any, spec: TaskSpec, requests: Sequence[Request], gen_config: Any, *,
                    rows: Any = None, image_column: str = "image", batch_size: int = 16,
                    num_workers: int = 0, opener: Callable[[ImageRef], Any] | None = None, by_page: bool = True,
                    sort_by_length: bool = True, thumbnail_size: int | None = None,
                    parse: bool = True) -> Iterator[list[Answer | Unreadable]]:
    """Answer every request, one list per batch (in the order batches finish, not the requests' order).

    ``rows``: the dataset :class:`ImageRef` rows index into (any object with ``rows[i][image_column]``);
    ``opener``: how a request's image is opened instead (a picklable callable, ``ImageRef`` → RGB image; eval
    passes its dataset's examples). ``by_page`` False: every row carries its own image (:func:`encode`), as an ONNX
    export always does. ``sort_by_length`` False: images in the order they first appear, each image's requests in
    their own order. ``thumbnail_size``: each answer carries a small JPEG of its image. Region tasks are parsed into
    the task's own structure in pixels (:func:`parse_answer`) unless ``parse`` is False; other tasks' parsed answer
    is the text.
    """
    from torch.utils.data import DataLoader

    from florence_kit.evaluate.region_answers import parse_answer

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {num_workers}")
    if not requests:
        return
    by_page = by_page and runs_pages(model)
    lengths = [0] * len(requests)
    if sort_by_length:  # each distinct prompt tokenised once: a corpus asks most images the same
        distinct = list(dict.fromkeys(r.prompt for r in requests))
        length_of = dict(zip(distinct, prompt_lengths(processor, distinct), strict=True))
        lengths = [length_of[r.prompt] for r in requests]
    order = page_order([r.image.image_key for r in requests], lengths)
    batches = [[requests[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers,
                        collate_fn=_Collator(processor, rows, image_column, by_page, opener, thumbnail_size))
    model.eval()
    for batch in loader:
        out: list[Answer | Unreadable] = list(batch.bad)
        if batch.requests:
            run = generate_pages if "image_index" in batch.inputs else generate_from_inputs
            texts = run(model, processor, batch.inputs, gen_config)
            thumbs = batch.thumbnails or [None] * len(texts)
            for request, size, text, thumb, prompt in zip(batch.requests, batch.sizes, texts, thumbs, batch.prompts,
                                                          strict=True):
                parsed = parse_answer(spec, processor, text, size) if spec.regions and parse else text
                out.append(Answer(request.index, size[0], size[1], text, parsed, thumb,
                                  prompt if request.box is not None else None))
        yield out
