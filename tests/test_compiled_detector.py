"""The compiled detector (torch.compile, inductor with freezing) scores as the eager one."""

import numpy as np
import pytest

from distill.checkpoint import load_detector, random_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_compiled_maps_match_eager_ones_and_a_short_batch_compiles_nothing_new(tmp_path):
    import torch._dynamo

    model = random_checkpoint(tmp_path / "m.pt", tile=64)
    eager, _ = load_detector(model, precision="fp32", batch_size=4)
    torch._dynamo.utils.counters.clear()
    compiled, _ = load_detector(model, precision="fp32", batch_size=4, compile=True)
    assert compiled.mode == "fp32 channels-last compiled"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1  # compiled when loaded, not at the first tiles it scores
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
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


def test_a_model_that_cannot_be_compiled_here_scores_eager_with_a_warning(tmp_path):
    """Inductor compiles C++ at the first batch: in the worker images, which carry no compiler,
    `ROLLSCAN_COMPILE_MODEL=1` failed every roll's first band. It is compiled when loaded now,
    and scores eager where it cannot be."""
    import os
    import subprocess
    import sys

    model = random_checkpoint(tmp_path / "m.pt", tile=64)
    script = (
        "import sys, warnings, numpy as np\n"
        "from distill.checkpoint import CompileFallbackWarning, load_detector\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always', CompileFallbackWarning)\n"
        "    d, _ = load_detector(sys.argv[1], precision='fp32', batch_size=2, compile=True)\n"
        "said = [str(w.message) for w in caught if w.category is CompileFallbackWarning]\n"
        "print(d.mode); print(said)\n"
        "print(d.predict(np.zeros((3, 64, 64, 3), np.uint8)).maps.shape)\n"
    )
    env = dict(os.environ, CXX="/nonexistent/g++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ic"))
    done = subprocess.run(
        [sys.executable, "-c", script, str(model)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mode, said, shape = done.stdout.strip().splitlines()[-3:]
    assert mode == "fp32 channels-last"
    assert "torch.compile failed" in said and "this model scores eager" in said
    assert shape == "(3, 64, 64)"


def test_running_out_of_memory_while_compiling_is_not_taken_for_a_compiler_fault(
    tmp_path, monkeypatch
):
    """Out of memory says the machine is full, not that it cannot compile: scoring eager would
    run out too, and the fallback's warning would hide the cause behind "torch.compile failed"."""
    import torch

    def full_machine(module, **_):
        def run(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return run

    monkeypatch.setattr(torch, "compile", full_machine)
    model = random_checkpoint(tmp_path / "m.pt", tile=64)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        load_detector(model, precision="fp32", batch_size=2, compile=True)
