"""`rollscan submit`: register a roll from a folder or an S3 prefix and run it.

A folder holds `manifest.json` and `frames/<seq>.tif[f]` (seq = 1, 2, …); its files are
uploaded to the object store under the incoming prefix first, so the pipeline reads every roll
the same way. An `s3://BUCKET/PREFIX` must name the configured bucket; its objects are used
where they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distill.progress import progress_bar
from scheduler.roll_cursors import record_enqueued
from storage.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestLimits,
    check_manifest_size,
    frame_seq,
    parse_manifest,
    read_manifest,
)
from storage.objectstore import ObjectChanged, ObjectStore
from worker.context import WorkerContext
from worker.frames import max_frame_bytes
from worker.ingest import roll_updated
from worker.roll_rows import check_registrable, register_roll


@dataclass(frozen=True)
class Submission:
    """A submitted roll: its id, where its frames are, the frames (seq, key) sent to ingest, and
    the ETag of the manifest registered."""

    roll_id: str
    source: str
    frames: list[tuple[int, str]]  # (seq, key)
    manifest_etag: str | None = None


UPLOAD_BAR_BYTES = 64 << 20  # a smaller roll goes up in seconds: no bar


def _check_sequence(frames: list[tuple[int, str]], manifest: Manifest, where: str) -> None:
    seqs = [seq for seq, _ in frames]
    if not seqs:
        raise ValueError(f"{where}: no frames (frames/<seq>.tif, seq from 1)")
    if seqs != list(range(1, len(seqs) + 1)):
        twice = sorted({a for a, b in itertools.pairwise(seqs) if a == b})
        if twice:  # "1.tif" and "01.tif"
            raise ValueError(f"{where}: frames numbered twice: {twice[:10]}")
        raise ValueError(
            f"{where}: frames must be numbered 1, 2, …; missing {_first_gaps(seqs, 10)}"
        )
    if manifest.frames is not None and len(seqs) > manifest.frames:
        raise ValueError(f"{where}: {len(seqs)} frames but the manifest says {manifest.frames}")


def _first_gaps(seqs: list[int], n: int) -> list[int]:
    """The first `n` numbers missing from sorted `seqs` (never more than `n` built: a frame
    numbered 999999999 asked for a set of a billion)."""
    gaps: list[int] = []
    expected = 1
    for seq in seqs:
        while expected < seq and len(gaps) < n:
            gaps.append(expected)
            expected += 1
        if len(gaps) == n:
            break
        expected = seq + 1
    return gaps


def _check_frame_file(path: Path, max_pixels: int | None) -> None:
    """A frame is a regular file (a link to one is followed) no larger than any frame within
    `max_pixels` may be: a link to /dev/zero streamed into the store until the disk was full."""
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    size = path.stat().st_size
    if max_pixels is not None and size > (limit := max_frame_bytes(max_pixels)):
        raise ValueError(
            f"{path}: {size} bytes, more than any frame within ROLLSCAN_MAX_FRAME_PIXELS="
            f"{max_pixels} can have ({limit})"
        )


def upload_folder(
    store: ObjectStore,
    folder: Path,
    incoming_prefix: str,
    limits: ManifestLimits | None = None,
    check: Callable[[Manifest], None] | None = None,
    max_frame_pixels: int | None = None,
    progress: bool | None = None,
) -> tuple[Manifest, Submission]:
    """Validate a roll folder completely — `check` too, given the manifest; every frame a
    regular file no larger than a frame of `max_frame_pixels` can be — then upload it (frames
    first, manifest last), showing its progress (`progress`; None: for an upload of more than
    `UPLOAD_BAR_BYTES`, which takes long enough to need it)."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} has no manifest.json")
    check_manifest_size(manifest_path.stat().st_size)  # refused before a byte of it is read
    with manifest_path.open("rb") as file:  # and never more read than a manifest may have
        manifest_bytes = file.read(MAX_MANIFEST_BYTES + 1)
    manifest = parse_manifest(manifest_bytes, limits)
    frame_dir = folder / "frames"
    named = sorted(
        (seq, path)
        for path in (frame_dir.iterdir() if frame_dir.is_dir() else [])
        if (seq := frame_seq(path.name)) is not None
    )
    _check_sequence([(s, p.name) for s, p in named], manifest, str(folder))
    for _, path in named:  # before any upload: a refused folder leaves nothing in the store
        _check_frame_file(path, max_frame_pixels)
    if check is not None:
        check(manifest)
    prefix = f"{incoming_prefix.rstrip('/')}/{manifest.roll_id}"
    frames = []
    # a roll of tens of GB goes up for minutes: its bytes, rate and time left are shown
    sizes = [path.stat().st_size for _, path in named]
    shown = sum(sizes) > UPLOAD_BAR_BYTES if progress is None else progress
    with progress_bar(total=sum(sizes), desc=f"upload {manifest.roll_id}", unit="B",
                      unit_scale=True, unit_divisor=1024, disable=not shown) as bar:  # fmt: skip
        for (seq, path), size in zip(named, sizes, strict=True):
            key = f"{prefix}/frames/{path.name}"
            with path.open("rb") as stream:
                store.put(key, stream)
            frames.append((seq, key))
            bar.update(size)
    etag = store.put(f"{prefix}/manifest.json", manifest_bytes)  # the bytes checked
    return manifest, Submission(manifest.roll_id, prefix, frames, etag)


def read_prefix(
    store: ObjectStore, prefix: str, limits: ManifestLimits | None = None
) -> tuple[Manifest, Submission]:
    prefix = prefix.strip("/")
    key = f"{prefix}/manifest.json"
    try:  # the version headed, refused from its size before a byte of it is read
        info = store.head(key)
        manifest = read_manifest(store, info, limits)
    except ObjectChanged:
        raise ValueError(f"{key} was replaced while it was read: submit again") from None
    frames = sorted(
        (seq, info.key)
        for info in store.iter_objects(f"{prefix}/frames/")
        # directly under frames/, as discovery and `resume` take them: not frames/old/3.tif
        if (seq := frame_seq(info.key[len(prefix) + len("/frames/") :])) is not None
    )
    _check_sequence(frames, manifest, f"s3 prefix {prefix}")
    return manifest, Submission(manifest.roll_id, prefix, frames, info.etag)


def _registrable(ctx: WorkerContext, manifest: Manifest) -> None:
    # before the upload: a refused manifest must not leave its frames over the roll's own,
    # which a later `rollscan resume` would take for replaced frames and ingest
    with ctx.session() as session:
        check_registrable(session, manifest)


def submit(ctx: WorkerContext, target: str) -> Submission:
    """Register the roll and enqueue its frames in order; returns what was submitted."""
    settings = ctx.settings
    limits = ManifestLimits.from_settings(settings)
    if target.startswith("s3://"):
        bucket, _, prefix = target[5:].partition("/")
        if settings.s3_endpoint is None or bucket != settings.s3_bucket:
            raise ValueError(
                f"{target}: rollscan reads the configured bucket "
                f"({settings.s3_bucket if settings.s3_endpoint else 'no S3 configured'})"
            )
        manifest, submission = read_prefix(ctx.store, prefix, limits)
    else:
        folder = Path(target)
        if not folder.is_dir():
            raise FileNotFoundError(f"{target} is neither a folder nor an s3:// prefix")
        manifest, submission = upload_folder(
            ctx.store,
            folder,
            settings.incoming_prefix,
            limits,
            lambda m: _registrable(ctx, m),
            settings.max_frame_pixels,
        )
    with ctx.session() as session:
        register_roll(session, manifest, submission.source)
    sent = 0
    try:
        for seq, key in submission.frames:
            ctx.enqueue.ingest(submission.roll_id, seq, key)
            sent = seq
    finally:  # what went out, even when the broker failed halfway (discovery sends the rest)
        # the folder is the one discovery lists: without its cursor, the scheduler's next pass
        # sent every frame again, and each copy's ingest announced every band waiting
        record_enqueued(ctx, submission.roll_id, sent, submission.manifest_etag)
    roll_updated(ctx, submission.roll_id)  # a complete manifest: the last band becomes ready
    return submission
