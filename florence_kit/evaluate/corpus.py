"""``predict`` over a corpus: inputs → one ordered output file, resumable, sharded over processes and machines.

Each process (a torchrun / accelerate launch rank, or the only one) answers inputs r, r+N, ... of what is not done
yet (of a stream: its own shards, :class:`Stream`), and writes what it answers in chunk files under ``OUT.parts/``
(write, fsync, rename: a chunk is whole or absent, so a kill -9 loses at most the chunk in flight). When every rank
is done the main process merges all chunks into OUT in input order (again write, fsync, rename) and removes the
chunks. A rerun reads what OUT and the chunks already hold and skips it; a different model, task or prompt over the
same OUT is refused unless
``overwrite``. Several machines need OUT on a filesystem they share.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.common.files import atomic_write
from florence_kit.evaluate.batch import Answer, ImageRef, Request, Unreadable, answer_requests
from florence_kit.tasks.spec import TaskSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
FLUSH_EVERY = int(os.environ.get("FLORENCE_KIT_PREDICT_CHUNK", "64"))  # records per chunk file at most
FLUSH_SECONDS = 30.0  # and at least this often
SETTINGS = ("model", "task", "prompt", "dataset", "split")  # what must match for a rerun to continue an OUT


@dataclass
class Item:
    """One input: its image and, where the task asks one, its question."""

    image: ImageRef
    question: str | None = None
    info: dict[str, Any] | None = None  # what its record says of it (default: its path)
    box: str | None = None  # region-in tasks: x1,y1,x2,y2 in pixels, checked once the image is open


@dataclass
class Counts:
    answered: int = 0
    skipped: int = 0  # already in OUT or its chunks
    unreadable: int = 0  # in the sidecar, this run's and earlier ones'
    total: int = 0
    answered_before: int = 0  # of the skipped, those with an answer (the rest were unreadable before)


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(args: Sequence[str]) -> list[Item]:
    """Files, folders (recursive, image suffixes), globs and ``@list`` files (one path a line, relative to the
    list; ``@list.jsonl``: objects with ``image`` and optionally ``question`` and ``box``), in the order given, each
    (path, question, box) once.

    A path that names nothing is a typo (one line, exit 2); a file a list names that cannot be read is an
    unreadable image, counted and skipped like a broken one.
    """
    items: list[Item] = []
    seen: set[str] = set()

    def add(path: str, question: str | None = None, box: str | None = None) -> None:
        key = path if question is None else f"{path}#{question}"  # one image asked several questions: one each
        key = key if box is None else f"{key}#box={box}"  # and about several boxes
        if key not in seen:
            seen.add(key)
            items.append(Item(ImageRef(key, path=path, page=path), question, None, box))

    for arg in args:
        if arg.startswith("@"):
            for path, question, box in _read_list(Path(arg[1:]).expanduser()):
                add(path, question, box)
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"folder '{arg}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for p in found:
                add(p)
        elif path.is_file():
            add(str(path))
        elif glob.has_magic(arg):
            matched = sorted(p for p in glob.glob(os.path.expanduser(arg), recursive=True) if os.path.isfile(p))
            if not matched:
                raise UserError(f"'{arg}' matches no file")
            for p in matched:
                add(p)
        else:
            raise UserError(f"input '{arg}' does not exist (a file, a folder, a glob or @list.txt)")
    return items


def _read_list(path: Path) -> list[tuple[str, str | None, str | None]]:
    if not path.is_file():
        raise UserError(f"list file '{path}' does not exist")
    out: list[tuple[str, str | None, str | None]] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        question = box = None
        if jsonl:
            try:
                row = json.loads(line)
                name, question, box = str(row["image"]), row.get("question"), box_text(row.get("box"))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{number}: each line needs a JSON object with 'image'") from None
        else:
            name = line.strip()
        full = Path(name).expanduser()
        out.append((str(full if full.is_absolute() else path.parent / full), question, box))
    return out


# ---------------------------------------------------------------------------------------------
# Output files


def is_folder_format(fmt: str) -> bool:
    return fmt in ("coco", "yolo", "florence-jsonl")


def records_path(out: Path, fmt: str) -> Path:
    """The ordered records file: OUT itself, or OUT/predictions.jsonl when OUT is a dataset folder."""
    return out / "predictions.jsonl" if is_folder_format(fmt) else out


def sidecar_path(records: Path) -> Path:
    """``out.jsonl`` → ``out.bad.jsonl``: each unreadable input with the reason."""
    return records.with_name(records.name.rsplit(".", 1)[0] + ".bad.jsonl")


def parts_path(records: Path) -> Path:
    return records.with_name(records.name + ".parts")


def _write_jsonl(records: Iterable[dict[str, Any]]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for rec in records:
                handle.write(json.dumps(rec, ensure_ascii=False) + "\n")

    return write


def _write_parquet(records: list[dict[str, Any]]) -> Callable[[Path], None]:
    """Parquet wants one type per column: the parsed answer (text or a structure) is kept as its JSON text."""

    def write(tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{**rec, "answer": json.dumps(rec["answer"], ensure_ascii=False)} for rec in records]
        columns = list(dict.fromkeys(k for rec in rows for k in rec))
        table = pa.table({c: [rec.get(c) for rec in rows] for c in columns}) if rows else pa.table({})
        pq.write_table(table, tmp)

    return write


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL or Parquet output (or chunk); a torn last line (none is ever written) is ignored."""
    if not path.is_file():
        return []
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [{**r, "answer": json.loads(r["answer"])} if isinstance(r.get("answer"), str) else r for r in rows]
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------------------------------------
# Processes


def dist_info() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) alone. Joins the process group once
    (gloo: it only carries barriers, so it runs beside CUDA too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        # a rank that finishes its share waits for the slowest at the barrier: days, not gloo's 30 minutes
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The run


def _settings_of(records: Path, parts: Path) -> dict[str, Any] | None:
    meta = parts / "settings.json"
    if meta.is_file():
        return json.loads(meta.read_text(encoding="utf-8"))
    for path in (records, sidecar_path(records)):
        for rec in read_records(path)[:1]:
            return {k: rec.get(k) for k in SETTINGS}
    return None


def _fits_template(prompt: Any, template: Any) -> bool:
    """Whether ``prompt`` (a finished record's) is ``template`` with its questions filled in."""
    import re

    from florence_kit.tasks.spec import template_fields

    if not isinstance(prompt, str) or not isinstance(template, str) or not template_fields(template):
        return False
    pattern = ".*".join(re.escape(part) for part in re.split(r"\{[^{}]*\}", template))
    return re.fullmatch(pattern, prompt, flags=re.S) is not None


def check_settings(records: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to continue an OUT that another model, task or prompt wrote (unless ``overwrite``)."""
    if overwrite:
        return
    found = _settings_of(records, parts_path(records))
    if found is None:
        return
    differ = [k for k in SETTINGS if found.get(k) != settings.get(k)
              and not (k == "prompt" and _fits_template(found.get(k), settings.get(k)))]
    if differ:
        what = "; ".join(f"{k} {found.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
        raise UserError(f"'{records}' holds answers of another run ({what}): pass --overwrite to replace them, "
                        "or another --output")


def _done(records: Path) -> dict[str, dict[str, Any]]:
    """key → record of every input already answered or found unreadable (OUT, its sidecar, the chunks)."""
    done: dict[str, dict[str, Any]] = {}
    for path in (records, sidecar_path(records), *sorted(parts_path(records).glob("*.jsonl"))):
        for rec in read_records(path):
            done[str(rec.get("key"))] = rec
    return done


class ChunkWriter:
    """Buffers this rank's records and writes them as whole chunk files under the parts folder."""

    def __init__(self, parts: Path, rank: int) -> None:
        self.parts, self.stem, self.seq = parts, f"rank{rank:05d}-{uuid.uuid4().hex[:10]}", 0
        self.buffer: list[dict[str, Any]] = []
        self.last = time.monotonic()

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        self.buffer.extend(records)
        if len(self.buffer) >= FLUSH_EVERY or time.monotonic() - self.last > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            atomic_write(self.parts / f"{self.stem}-{self.seq:06d}.jsonl", _write_jsonl(self.buffer))
            self.seq += 1
            self.buffer = []
        self.last = time.monotonic()


def answer_record(base: dict[str, Any], result: Answer | Unreadable, settings: dict[str, Any],
                  prompt: str) -> dict[str, Any]:
    """One output record: ``base`` (key, path or row), then the answer or the reason it has none. The HTTP API's
    ``/v1/florence/predict`` answers with the same record, so a record means one thing wherever it comes from."""
    if isinstance(result, Unreadable):
        return {**base, "error": result.reason, **settings}
    return {**base, "width": result.width, "height": result.height, **settings, "prompt": prompt,
            "text": result.text, "answer": result.parsed}


def predict_corpus(model: Any, processor: Any, spec: TaskSpec, items: Sequence[Item] | None, out: Path, *,
                   model_name: str, prompt_for: Callable[[Item], str], gen_config: Any, prompt_label: str,
                   fmt: str = "jsonl", rows: Any = None, blocks: Iterable[tuple[Sequence[Item], Any]] | None = None,
                   image_column: str = "image", batch_size: int = 16, num_workers: int = 0, overwrite: bool = False,
                   copy_images: bool = False, show_progress: bool = True, source: dict[str, Any] | None = None,
                   box_for: Callable[[Item], str | None] | None = None) -> Counts:
    """Answer ``items`` into ``out`` (see the module's docstring); every rank calls it, rank 0 merges.

    ``prompt_for`` gives each item's prompt (the task's, with its question); ``prompt_label`` is the prompt a rerun
    must match (the prompt itself, or the task's template when questions vary); ``rows`` the dataset the items'
    :class:`ImageRef` rows point into. A stream passes ``blocks`` instead, a :class:`Stream`: (items, rows) of this
    process's part, one block in memory at a time. ``source`` (``dataset``, ``split``) names the dataset whose row
    numbers the keys are. ``box_for`` gives each item's box for a region-in task (text, checked against its image
    once that is open: a bad one puts the input in the sidecar with the reason).
    """
    rank, world = dist_info()
    records_file = records_path(out, fmt)
    parts = parts_path(records_file)
    settings = {"model": model_name, "task": spec.name, "prompt": prompt_label, **(source or {})}
    check_settings(records_file, settings, overwrite)  # every rank: all refuse alike, none waits for a refuser
    if rank == 0:
        if overwrite:
            shutil.rmtree(parts, ignore_errors=True)
            for path in (records_file, sidecar_path(records_file)):
                path.unlink(missing_ok=True)
        parts.mkdir(parents=True, exist_ok=True)
        if not (parts / "settings.json").is_file():
            atomic_write(parts / "settings.json", lambda p: p.write_text(json.dumps(settings) + "\n"))
    barrier(world)
    done = _done(records_file)
    stream = blocks if isinstance(blocks, Stream) else None  # its blocks hold this process's rows only
    if blocks is None:
        blocks = [(list(items or []), rows)]
    seen: list[Item] = []
    writer = ChunkWriter(parts, rank)
    counts = Counts()
    total = len(items) if items is not None else None
    with _progress(show_progress and rank == 0, total, world) as advance:
        for block, block_rows in blocks:
            pending = [item for item in block if item.image.key not in done]
            advance(len(block) - len(pending), world=stream is not None)
            if stream is None:
                seen.extend(block)
            counts.skipped += len(block) - len(pending)
            counts.answered_before += sum(1 for item in block if "error" not in done.get(item.image.key, {"error": 1}))
            mine = pending if stream is not None else pending[rank::world]
            requests = [Request(n, item.image, prompt_for(item), box_for(item) if box_for else None)
                        for n, item in enumerate(mine)]
            for results in answer_requests(model, processor, spec, requests, gen_config, rows=block_rows,
                                           image_column=image_column, batch_size=batch_size,
                                           num_workers=num_workers):
                batch = []
                for result in results:
                    item = mine[result.index]
                    base = {"key": item.image.key, **(item.info or {"path": item.image.path})}
                    if requests[result.index].box is not None:
                        base["box"] = requests[result.index].box
                    prompt = getattr(result, "prompt", None) or requests[result.index].prompt  # a box's prompt
                    batch.append(answer_record(base, result, settings, prompt))
                writer.add(batch)
                advance(len(results))
    writer.flush()
    keys = [item.image.key for item in seen]
    if stream is not None:  # each process read its own shards: the counts and the input order are gathered
        shares = _gather((stream.rows_per_shard, counts.skipped, counts.answered_before), world)
        counts.skipped = sum(share[1] for share in shares)
        counts.answered_before = sum(share[2] for share in shares)
        keys = stream.order([share[0] for share in shares])
    counts.total = len(keys)
    barrier(world)
    if rank == 0:
        counts = _merge(keys, records_file, fmt, counts, rows, image_column, copy_images, out,
                        number_rows=stream is not None)
    barrier(world)
    return counts


def _gather(value: Any, world: int) -> list[Any]:
    """``value`` of every process, in rank order (over the gloo group :func:`dist_info` joined)."""
    if world <= 1:
        return [value]
    import torch.distributed as dist

    found: list[Any] = [None] * world
    dist.all_gather_object(found, value)
    return found


def _merge(keys: Sequence[str], records_file: Path, fmt: str, counts: Counts, rows: Any, image_column: str,
           copy_images: bool, out: Path, number_rows: bool = False) -> Counts:
    """Every record in input order (``keys``) into OUT and the sidecar; ``number_rows``: each record's ``row`` is
    its place in that order (a stream's, which no single process knows while answering)."""
    done = _done(records_file)
    ordered = [done[key] for key in keys if key in done]
    if number_rows and len(ordered) == len(keys):
        for number, rec in enumerate(ordered):
            rec["row"] = number
    good = [rec for rec in ordered if "error" not in rec]
    bad = [rec for rec in ordered if "error" in rec]
    missing = len(keys) - len(ordered)
    if missing:  # a rank died between its last chunk and the barrier: nothing is merged, a rerun finishes
        raise UserError(f"{missing} input(s) have no answer in {parts_path(records_file)}; run the same command "
                        "again to answer them")
    records_file.parent.mkdir(parents=True, exist_ok=True)
    if is_folder_format(fmt):
        from florence_kit.evaluate.labels import write_dataset

        write_dataset(out, fmt, good, rows=rows, image_column=image_column, copy_images=copy_images)
    writer = _write_parquet(good) if records_file.suffix.lower() == ".parquet" else _write_jsonl(good)
    atomic_write(records_file, writer)
    sidecar = sidecar_path(records_file)
    if bad:
        atomic_write(sidecar, _write_jsonl(bad))
    else:
        sidecar.unlink(missing_ok=True)
    shutil.rmtree(parts_path(records_file), ignore_errors=True)
    counts.answered = len(good) - counts.answered_before
    counts.unreadable = len(bad)
    return counts


class _progress:
    """A rich progress bar with images/s and ETA on the main process; nothing elsewhere."""

    def __init__(self, show: bool, total: int | None, world: int) -> None:
        self.show, self.total, self.world = show, total, world

    def __enter__(self) -> Callable[..., None]:
        if not self.show:
            return lambda n, world=True: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        class Rate(TextColumn):
            def render(self, task: Any) -> Any:
                from rich.text import Text

                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f} images/s" if speed else "- images/s")

        self.bar = Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), Rate(""),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=True)
        self.bar.start()
        task = self.bar.add_task("predict", total=self.total)

        def advance(n: int, world: bool = True) -> None:
            # this process answers 1/world of the inputs: the bar counts them world-fold; skipped ones once
            if n:
                self.bar.advance(task, n * self.world if world else n)

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------
# Dataset inputs


STREAM_BLOCK = 4096  # rows of a stream held in memory at a time (images still encoded)


@dataclass
class DatasetInputs:
    """A dataset's rows as inputs: ``items`` and the ``rows`` they point into, or for a stream ``blocks``."""

    items: list[Item] | None
    rows: Any
    blocks: Iterable[tuple[list[Item], Any]] | None
    varied_questions: bool
    split: str | None = None


def dataset_items(source: str, split: str | None, image_column: str, question_column: str | None,
                  streaming: bool, box_column: str | None = None) -> DatasetInputs:
    """Every row of ``source``'s split as an input (key: the row number; the record says ``row`` and ``id`` where the
    dataset has that column). A page asked several questions (rows showing the same image) is one ``page``."""
    import datasets

    from florence_kit.data.dataset import load_source

    loaded = load_source(source, streaming=streaming)
    chosen = split
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(loaded)
        chosen = split or ("train" if "train" in names else names[0])
        if chosen not in loaded:
            raise UserError(f"--split '{chosen}' is not in '{source}' (it has {', '.join(names)})")
        ds = loaded[chosen]
    elif split:
        raise UserError(f"'{source}' has no splits; leave out --split")
    else:
        ds = loaded
    columns = list(ds.column_names or [])
    if columns and image_column not in columns:
        raise UserError(f"'{source}' has no column '{image_column}' (it has {', '.join(columns)}); pass "
                        "--image-column")
    for column in (question_column, box_column):
        if columns and column and column not in columns:
            raise UserError(f"'{source}' has no column '{column}' (it has {', '.join(columns)})")
    if isinstance(ds, datasets.IterableDataset):
        return DatasetInputs(None, None, Stream(ds, image_column, question_column, box_column),
                             bool(question_column), chosen)
    from florence_kit.data.prepared import column_image_keys

    questions = ds[question_column] if question_column else [None] * len(ds)
    boxes = ds[box_column] if box_column else [None] * len(ds)
    ids = ds["id"] if "id" in columns else None
    pages = column_image_keys(ds, image_column)  # a page asked several questions is decoded and encoded once
    items = [Item(ImageRef(str(i), row=i, page=page), None if q is None else str(q),
                  {"row": i, **({"id": ids[i]} if ids is not None else {})}, box_text(box))
             for i, (q, page, box) in enumerate(zip(questions, pages, boxes, strict=True))]
    return DatasetInputs(items, ds, None, bool(question_column), chosen)


class Stream:
    """A streamed split as blocks of at most :data:`STREAM_BLOCK` rows (encoded images), each process reading only
    its own part of it.

    The part is the one ``datasets.distributed.split_dataset_by_node`` assigns: with at least as many shards (data
    files) as processes, whole shards, process r taking shards r, r+N, r+2N, ... and reading nothing else; with fewer,
    every process reads every row and keeps one in N. Rows so split carry no shard number, and a process cannot know
    how many rows the others' shards hold, so no process knows an input's place in the stream while answering it.
    Hence each shard is opened alone (``IterableDataset.shard``, the same assignment) and an input is keyed by
    its shard and its place in that shard (``S:I``; just ``I`` for a one-shard stream): the same keys whatever the
    number of processes. Once all are done, the row counts of every shard give the main process the input order,
    and each record's ``row`` (:meth:`order`).
    """

    def __init__(self, ds: Any, image_column: str, question_column: str | None, box_column: str | None = None) -> None:
        import datasets

        # images stay encoded until a worker opens them (rows of unknown features come undecoded already)
        self.ds = ds.cast_column(image_column, datasets.Image(decode=False)) if ds.features else ds
        self.image_column, self.question_column, self.box_column = image_column, question_column, box_column
        self.num_shards = int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1) or 1)
        self.rows_per_shard: dict[int, int] = {}  # of the shards this process read: rows in each
        self.rows_read = 0  # rows this process read from the stream (its part; every row with fewer shards)

    def key(self, shard: int, offset: int) -> str:
        return str(offset) if self.num_shards == 1 else f"{shard}:{offset}"

    def _rows(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(shard, place in it, row) of this process's rows, in stream order."""
        rank, world = dist_info()
        whole_shards = world > 1 and self.num_shards >= world
        kept = 0
        for shard in range(rank if whole_shards else 0, self.num_shards, world if whole_shards else 1):
            part = self.ds if self.num_shards == 1 else self.ds.shard(num_shards=self.num_shards, index=shard)
            offset = -1
            for offset, row in enumerate(part):
                self.rows_read += 1
                if whole_shards or kept % world == rank:
                    yield shard, offset, row
                kept += 1
            self.rows_per_shard[shard] = offset + 1

    def __iter__(self) -> Iterator[tuple[list[Item], list[dict[str, Any]]]]:
        block: list[dict[str, Any]] = []
        items: list[Item] = []
        for shard, offset, row in self._rows():
            question = row.get(self.question_column) if self.question_column else None
            box = row.get(self.box_column) if self.box_column else None
            key = self.key(shard, offset)
            items.append(Item(ImageRef(key, row=len(block)), None if question is None else str(question),
                              {"row": None, **({"id": row["id"]} if row.get("id") is not None else {})},
                              box_text(box)))
            block.append({self.image_column: row.get(self.image_column)})
            if len(block) == STREAM_BLOCK:
                yield items, block
                block, items = [], []
        if block:
            yield items, block

    def order(self, shares: Sequence[dict[int, int]]) -> list[str]:
        """Every input's key in stream order, from the rows each process found in its shards."""
        rows: dict[int, int] = {}
        for share in shares:
            rows.update(share)
        return [self.key(shard, offset) for shard in sorted(rows) for offset in range(rows[shard])]


def box_text(value: Any) -> str | None:
    """A box as a column or a JSONL field holds it (``"x1,y1,x2,y2"`` or four numbers) → the text ``--box`` takes;
    anything else is kept as text and refused, with the reason, when its image is answered."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
