"""What the discovery tests share (a pytest plugin): a context whose enqueuer only records
(`rec`, on the test's database and a fresh S3 bucket, `s3_store`, with a fake active model so
rolls can have runs), its settings (`discovery_settings`), and helpers that upload a roll's
manifest and frames the way a scanner does. Used by test_discovery.py, test_discovery_names.py,
test_scheduler_loop.py and test_scheduler_metrics.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from kombu.exceptions import OperationalError

from storage.schema import Model, Roll
from storage.settings import Settings
from worker.context import WorkerContext

PX_PER_MM, BAND, ROWS, WIDTH = 10.0, 256, 256, 256  # frames of 256 rows, bands of 256
FABRIC = "demo-twill"


@dataclass
class RecordingEnqueuer:
    """Records what would be enqueued; `fail` raises a broker error for the next n ingests."""

    calls: list[tuple] = field(default_factory=list)
    fail: int = 0

    def ingest(self, roll_id: str, seq: int, key: str) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise OperationalError("[Errno 111] Connection refused (broker)")
        self.calls.append(("ingest", roll_id, seq))

    def score(self, run_id: int, band_index: int, reprocess: bool = False) -> None:
        self.calls.append(("score", run_id, band_index))

    def finalize(self, run_id: int) -> None:
        self.calls.append(("finalize", run_id))


@pytest.fixture
def discovery_settings(tmp_path):
    return Settings(band_height=BAND, data_dir=tmp_path / "data", device="cpu", batch_size=8)


@pytest.fixture
def rec(db_engine, s3_store, discovery_settings):
    """A context whose enqueuer only records; a (fake) active model so rolls can have runs."""
    ctx = WorkerContext(discovery_settings, db_engine, s3_store, RecordingEnqueuer(), device="cpu")
    with ctx.session() as session:
        session.add(Model(version="fake-1", fabric_type=FABRIC, variant="residual", teacher="t",
                          tile=128, checkpoint_uri="none", sha256="0" * 64, threshold=1.0,
                          active=True))  # fmt: skip
    return ctx


def manifest_of(roll_id, frames=None, complete=False, **extra):
    return {"roll_id": roll_id, "fabric_type": FABRIC, "width_mm": WIDTH / PX_PER_MM,
            "px_per_mm": PX_PER_MM, "frames": frames, "complete": complete, **extra}  # fmt: skip


def put_manifest(store, roll_id, manifest):
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    store.put(f"incoming/{roll_id}/manifest.json", data)


def put_frames(store, roll_id, seqs, folder=None):
    for seq in seqs:
        data = (folder / "frames" / f"{seq:06d}.tif").read_bytes() if folder else b"frame%d" % seq
        store.put(f"incoming/{roll_id}/frames/{seq:06d}.tif", data)


def ingests_of(ctx):
    """The (roll, seq) of each ingest the recording context was asked for, in order."""
    return [c[1:] for c in ctx.enqueue.calls if c[0] == "ingest"]


def roll_row(ctx, roll_id):
    with ctx.session() as session:
        return session.get(Roll, roll_id)
