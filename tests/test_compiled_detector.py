"""The compiled detector (torch.compile, inductor with freezing) scores as the eager one."""

import numpy as np
import pytest

from distill.checkpoint import load_detector, random_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_compiled_maps_match_eager_ones_and_a_short_batch_compiles_nothing_new(tmp_path):
    import torch._dynamo

    model = random_checkpoint(tmp_path / "m.pt", tile=64)
    eager, _ = load_detector(model, precision="fp32", batch_size=4)
    compiled, _ = load_detector(model, precision="fp32", batch_size=4, compile=True)
    assert compiled.mode == "fp32 channels-last compiled"
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    torch._dynamo.utils.counters.clear()
    compiled.predict(images[:4])  # compiles
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    want, got = eager.predict(images), compiled.predict(images)  # batches of 4 and 2
    assert got.maps.shape == want.maps.shape == (6, 64, 64)
    scale = float(np.abs(want.maps).max())
    assert np.abs(got.maps - want.maps).max() <= 1e-3 * scale
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-3)
    # the short last batch was padded to the batch size: nothing compiled again
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # tiles holding the table beside the fabric: the compiled path maps them as the eager one
    fabric = np.ones((6, 64, 64), bool)
    fabric[[1, 4], :, :20] = False
    want, got = eager.predict(images, fabric), compiled.predict(images, fabric)
    assert np.abs(got.maps - want.maps).max() <= 1e-3 * scale
    plain = eager.predict(images).maps
    assert not np.array_equal(want.maps[[1, 4]], plain[[1, 4]])
    np.testing.assert_array_equal(want.maps[[0, 2, 3, 5]], plain[[0, 2, 3, 5]])
