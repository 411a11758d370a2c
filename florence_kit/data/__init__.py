"""Stage 2, data: rows from a source (hub id, local folder, parquet/JSONL, COCO, YOLO) become examples.

``dataset`` loads sources and renders (image, prompt, target, references); ``rows`` and ``regions`` shape
rows; ``mixing`` combines tasks; ``collate`` pads (labels: pad -> -100); ``prepared`` decodes images once.
"""
