"""Shared by every stage: the one-line user errors, version records, and the ``<loc_*>`` geometry.

Boxes, quads and polygons are encoded into targets by data/, parsed back by evaluate/ and drawn by
present/, so the geometry lives here, below all of them (``masks``: RLE masks <-> polygons, for segmentation).
Nothing here imports another stage.
"""
