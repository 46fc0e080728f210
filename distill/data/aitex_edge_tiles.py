"""Where an AITEX strip's tiles meet the fabric's edge: the fabric's columns within each grid
tile, the tiles half a tile off the grid across the edge, and the tiles that start at the edge.

The importer (`distill.data.aitex`) cuts these beside the grid's tiles so that a model's
training holds the views of the selvage the pipeline will show it (docs/benchmarks.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from distill.fabric_region import Extent


def tile_fabric_columns(extent: Extent, x: int, tile: int) -> tuple[int, int]:
    """The fabric's columns within the tile whose first column is `x`, clipped to [0, tile]."""
    x0 = min(max(extent.left - x, 0), tile)
    return x0, min(max(extent.right - x, x0), tile)


def grid_fabric_columns(
    extents: list[Extent], width: int, tile: int
) -> dict[tuple[int, int], tuple[int, int]]:
    """Fabric columns within each tile (row, column) of the grid, for tiles not all fabric."""
    regions = {}
    for r, extent in enumerate(extents):
        for c in range(width // tile):
            columns = tile_fabric_columns(extent, c * tile, tile)
            if columns != (0, tile):
                regions[(r, c)] = columns
    return regions


def tiles_across_the_edge(
    image: np.ndarray, extents: list[Extent], tile: int
) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    """(tag, tile, fabric columns) of the tiles half a tile off the grid that hold the fabric's
    edge: at least an eighth of a tile of fabric, not fabric throughout (tag `hCC`, or
    `yRR_hCC` for strips taller than a tile; CC = x // tile).

    The pipeline scores tiles at its own stride, so it sees the fabric beside the margin at every
    offset; the grid may see it at none (fabric 06's edge lies on a tile boundary, and a grid
    tile holding less than half a tile of fabric is dropped as margin). A memory bank that never
    held fabric beside the margin scores the first millimetres of every edge as a flaw
    (docs/benchmarks.md)."""
    out = []
    for r, extent in enumerate(extents):
        for x in range(tile // 2, image.shape[1] - tile + 1, tile):
            x0, x1 = tile_fabric_columns(extent, x, tile)
            if x1 - x0 < tile // 8 or (x0, x1) == (0, tile):
                continue
            tag = f"h{x // tile:02d}" if len(extents) == 1 else f"y{r:02d}_h{x // tile:02d}"
            out.append((tag, image[r * tile : (r + 1) * tile, x : x + tile], (x0, x1)))
    return out


def tiles_from_the_edges(
    image: np.ndarray, extents: list[Extent], tile: int
) -> list[tuple[str, np.ndarray]]:
    """(tag, tile) of the tiles that start at the fabric's left edge and end at its right edge,
    wholly on fabric (tags `lCC` and `rCC`, or `yRR_lCC`…; CC = x // tile).

    For a model trained with the fabric tile layout the pipeline lays a row's tiles on the
    fabric (`worker.tiling.row_columns`): the fabric's first columns are mapped by a tile that
    starts there, its border on the edge. That view (the selvage beside the tile's zero-padded
    border) is in no grid tile: without it the bank scores the selvage of every fabric whose
    edge is not on the grid as a flaw."""
    out = []
    for r, extent in enumerate(extents):
        if extent.width < tile:
            continue
        prefix = "" if len(extents) == 1 else f"y{r:02d}_"
        rows = slice(r * tile, (r + 1) * tile)
        if extent.left > 0:
            x = extent.left
            out.append((f"{prefix}l{x // tile:02d}", image[rows, x : x + tile]))
        if extent.right < image.shape[1]:
            x = extent.right - tile
            out.append((f"{prefix}r{x // tile:02d}", image[rows, x : x + tile]))
    return out


_EXTRA_TAG = re.compile(r"^(?:y(\d+)_)?[hlr](\d+)$")


def overlap_groups(stem: str, grid: dict[str, tuple[int, int]], extra: list[str]) -> dict[str, str]:
    """Group names for one strip's training tiles that share pixels, so that a held-out split
    keeps each group on one side (`distill.data.mvtec.GROUPS_FILE`).

    `grid`: tag → (row, column) of the grid tiles kept; `extra`: the tags of the tiles across or
    from the edge (`tiles_across_the_edge`, `tiles_from_the_edges`; tag CC = x // tile). An extra
    tile lies within grid columns CC and CC + 1 of its row, so it joins those two, and through
    them every tile overlapping it. Returns tag → group for the tiles of groups of two or more."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(key: tuple[int, int]) -> tuple[int, int]:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    extra_keys = {}
    for tag in extra:
        match = _EXTRA_TAG.match(tag)
        if match is None:
            raise ValueError(f"not an edge tile's tag: {tag!r}")
        row, column = int(match[1] or 0), int(match[2])
        extra_keys[tag] = (row, column)
        parent[root((row, column + 1))] = root((row, column))
    members = {tag: root(key) for tag, key in (*grid.items(), *extra_keys.items())}
    sizes: dict[tuple[int, int], int] = {}
    for key in members.values():
        sizes[key] = sizes.get(key, 0) + 1
    return {
        tag: f"{stem}_y{key[0]:02d}_c{key[1]:02d}" for tag, key in members.items() if sizes[key] > 1
    }


EDGE_START_TILE = re.compile(r"_(?:y\d+_)?[lr]\d+$")  # `import-aitex --edge-start-tiles`


def check_edge_start_tiles(paths: list[Path]) -> None:
    """Refuse training a fabric-layout model on `paths` when none is a tile that starts at the
    fabric's edge: such a model passed every check, then scored the selvage of each roll as one
    flaw the length of the roll."""
    if not any(EDGE_START_TILE.search(path.stem) for path in paths):
        raise ValueError(
            "--tile-layout fabric: no training tile starts at the fabric's edge (named "
            "*_lCC.png or *_rCC.png, as `rollscan datasets import-aitex --edge-start-tiles` "
            "cuts them): a model that never saw the selvage at a tile's border scores it as a flaw"
        )
