"""Masks <-> polygons without OpenCV: RLE masks become Florence-2 polygons, polygons become masks for scoring.

Tracing follows pixel edges (the outline of the pixel squares, so a traced mask rasterises back to itself up to
the simplification), one polygon per 4-connected part, then Douglas-Peucker at one pixel: a staircase along a
diagonal becomes one edge (1000 bins over a 640 px side are 0.64 px each). Florence-2's polygons have no holes:
a hole's outline is counted and left out (the object is learnt filled). pycocotools (the ``detection`` extra)
decodes RLE and rasterises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from florence_kit.common.errors import UserError

# direction index -> (dx, dy) on screen (y down); clockwise order: right, down, left, up
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def _boundary_edges(mask: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """Directed pixel-edge boundary, inside on the right of travel (outer outlines clockwise on screen)."""
    m = np.pad(mask.astype(bool), 1)
    edges: dict[tuple[int, int], list[int]] = {}
    # padded pixel (r, c) is image pixel (r-1, c-1): its corners are (c-1..c, r-1..r) in image corner coords
    inside = m[1:-1, 1:-1]
    rows, cols = np.nonzero(inside & ~m[:-2, 1:-1])  # top edge: (c, r) -> (c+1, r)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        edges.setdefault((c, r), []).append(0)
    rows, cols = np.nonzero(inside & ~m[1:-1, 2:])  # right edge: (c+1, r) -> (c+1, r+1)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        edges.setdefault((c + 1, r), []).append(1)
    rows, cols = np.nonzero(inside & ~m[2:, 1:-1])  # bottom edge: (c+1, r+1) -> (c, r+1)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        edges.setdefault((c + 1, r + 1), []).append(2)
    rows, cols = np.nonzero(inside & ~m[1:-1, :-2])  # left edge: (c, r+1) -> (c, r)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        edges.setdefault((c, r + 1), []).append(3)
    return edges


def _loops(edges: dict[tuple[int, int], list[int]]) -> list[list[tuple[int, int]]]:
    """Closed loops of corner points; at a corner shared by two diagonal pixels, turn right (4-connected)."""
    loops = []
    while edges:
        start = next(iter(edges))
        point, heading = start, edges[start][0]
        loop = []
        while True:
            outs = edges.get(point)
            if not outs:
                break
            # prefer a right turn, then straight, then left
            for turn in (1, 0, 3):
                d = (heading + turn) % 4
                if d in outs:
                    break
            else:
                d = outs[0]
            outs.remove(d)
            if not outs:
                del edges[point]
            if d != heading or not loop:
                loop.append(point)
            heading = d
            point = (point[0] + _DIRS[d][0], point[1] + _DIRS[d][1])
            if point == start and start not in edges:
                break
        if len(loop) >= 3:
            loops.append(loop)
    return loops


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed loop (split at the point farthest from the first)."""
    if len(points) < 4 or tolerance <= 0:
        return points
    far = int(np.argmax(((points - points[0]) ** 2).sum(1)))
    keep = np.zeros(len(points), bool)
    keep[0] = keep[far] = True
    stack = [(0, far), (far, len(points))]
    closed = np.vstack([points, points[:1]])
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        p, q = closed[a], closed[b]
        seg = closed[a + 1:b]
        d = q - p
        norm = float(np.hypot(*d))
        if norm == 0:
            dist = np.hypot(*(seg - p).T)
        else:
            dist = np.abs(d[0] * (seg[:, 1] - p[1]) - d[1] * (seg[:, 0] - p[0])) / norm
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            keep[a + 1 + k] = True
            stack += [(a, a + 1 + k), (a + 1 + k, b)]
    return points[keep]


def mask_to_polygons(mask: Any, tolerance: float = 1.0) -> tuple[list[list[float]], int]:
    """``(polygons, holes)``: one flat pixel polygon per 4-connected part's outline (clockwise on screen),
    simplified to ``tolerance`` pixels, and how many holes were filled (Florence-2's polygons have no holes)."""
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        return [], 0
    polygons, holes = [], 0
    for loop in _loops(_boundary_edges(mask)):
        pts = np.asarray(loop, dtype=float)
        signed = 0.5 * float(np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1]))
        if signed < 0:  # counter-clockwise: the outline of a hole
            holes += 1
            continue
        pts = _simplify(pts, tolerance)
        if len(pts) >= 3:
            polygons.append([float(v) for v in pts.reshape(-1)])
    return polygons, holes


def rle_to_polygons(rle: dict[str, Any], tolerance: float = 1.0) -> tuple[list[list[float]], int]:
    """A COCO RLE (compressed string or uncompressed list ``counts``, with ``size`` [h, w]) -> polygons, holes."""
    mask_utils = coco_mask()
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, str):
        rle = {"size": [h, w], "counts": counts.encode("ascii")}
    return mask_to_polygons(mask_utils.decode(rle), tolerance)


def coco_mask() -> Any:
    """pycocotools' mask module, or one line naming the extra."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise UserError("masks need pycocotools: pip install 'florence-kit[detection]'") from None
    return mask_utils


def polygons_to_rle(polygons: Sequence[Sequence[float]], size: tuple[int, int]) -> dict[str, Any]:
    """One object's flat pixel polygons rasterised at ``size`` (w, h) as one COCO RLE (empty when none has 3 points)."""
    mask_utils = coco_mask()
    w, h = size
    polys = [[float(v) for v in p] for p in polygons if len(p) >= 6]  # 4 numbers would be read as a box
    if not polys:
        return mask_utils.encode(np.asfortranarray(np.zeros((h, w), np.uint8)))
    return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
