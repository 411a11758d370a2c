"""Stage 2, data: rows from a source (hub id, local folder, parquet/JSONL, COCO, YOLO) become examples.

``dataset`` loads sources and renders (image, prompt, target, references); ``rows`` and ``regions`` shape
rows (``region_units``: one example per object or phrase, for segmentation and the region-in tasks); ``mixing``
combines tasks; ``collate`` pads (labels: pad -> -100); ``prepared`` decodes images once.
"""
