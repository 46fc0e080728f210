"""A small model really trained on synthetic twill, once per test session (≈ 20 s on 2 cores)."""

from pathlib import Path

import pytest

from distill.data.synthetic_defects import write_category
from distill.memory_bank import DEFAULT_LEVELS
from distill.train import TrainConfig, train

TWILL_SEED = 7
TRAIN_TILE = 128  # the model takes any size; small training tiles keep the suite fast
# The pipeline tests pin the positions this model finds on synthetic rolls, so its recipe is
# fixed, not chosen: the teacher and fusion weight it was verified with (auto selection chose
# 0.25 before the one-standard-error rule; with the rule, a dozen held-out tiles make the
# tolerance 0.017 and the bank alone is taken, which misses a planted defect; with the lite1
# default too, the fabric's edges on a table were flagged — recorded in docs/benchmarks.md).
RECIPE = {
    "teacher": "efficientnet_lite0", "scorer": "fused", "fusion_weight": 0.25,
    "memory_levels": DEFAULT_LEVELS,
}  # fmt: skip


@pytest.fixture(scope="session")
def twill_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("twill-model")
    data = write_category(root / "data", n_train=40, n_test_good=4, n_test_defect=4,
                          tile=TRAIN_TILE, weave="twill", seed=TWILL_SEED)  # fmt: skip
    out = root / "model.pt"
    train(data, out, TrainConfig(epochs=6, tile=TRAIN_TILE, fpr=0.0, **RECIPE), progress=False)
    return out
