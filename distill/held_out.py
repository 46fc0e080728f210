"""The good training tiles held out of training: for the validation loss, the choice of the map
(`distill.selection`) and the threshold's calibration (`distill.calibration`)."""

from __future__ import annotations

import numpy as np


def split_held_out(
    n: int, ratio: float, seed: int, mode: str = "random", groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split into (train, held-out) indices; at least one image on each side. "random": seeded;
    "last": the last images in name order (for a roll, the fabric scanned last), so that the
    calibration sees the drift along the roll that a random split hides.

    `groups` (N,) labels: images of one group (tiles sharing pixels) fall on one side; whole
    groups are held out until the ratio is reached. Without it every image is a group of its
    own, and the split is the same as with singleton groups."""
    if n < 2:
        raise ValueError(f"need at least 2 good training images, found {n}")
    n_val = min(max(1, int(n * ratio)), n - 1)
    labels = np.arange(n) if groups is None else np.asarray(groups)
    if labels.shape != (n,):
        raise ValueError(f"groups must label each of the {n} images, not {labels.shape}")
    _, first, which = np.unique(labels, return_index=True, return_inverse=True)
    members = np.split(np.argsort(which, kind="stable"), np.cumsum(np.bincount(which))[:-1])
    if mode == "last":
        order = np.argsort([-m.max() for m in members], kind="stable")
    else:  # the groups in the order of their first image, shuffled
        order = np.argsort(first, kind="stable")[
            np.random.default_rng(seed).permutation(len(first))
        ]
    held: list[int] = []
    for g in order:
        if len(held) >= n_val:
            break
        held.extend(members[g])
    if len(held) >= n:
        raise ValueError("every good training image overlaps the others: none can be held out")
    held_idx = np.sort(np.array(held))
    return np.setdiff1d(np.arange(n), held_idx), held_idx
