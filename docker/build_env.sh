#!/bin/sh
# Builds rollscan's virtual environment, /opt/venv, in a build stage of docker/Dockerfile: the
# one recipe for both images. The CPU image (stage cpu-build, on the slim Python image) and the
# GPU image (stage gpu-build, on the CUDA base) install the same things the same way, but Docker
# cannot share a stage between two base images, so each of those stages copies this script and
# runs it, one step a RUN:
#
#   build_env.sh STEP PYTHON TORCH_INDEX_URL cpu|cuda
#
#   torch    the venv (made by PYTHON, e.g. python or python3.11) with an up-to-date pip, then
#            torch==$TORCH_VERSION and torchvision==$TORCHVISION_VERSION (the Dockerfile's build
#            args) from TORCH_INDEX_URL
#   deps     the project's dependencies: /src/requirements.txt at the versions CI tested
#            (/src/constraints.txt), torch held at its pins (/src/torch-constraints.txt)
#   project  the project from /src with its deploy and int8 extras (their packages are already
#            in), then the checks: pip check, the imports the services need, `rollscan --help`
#
# cpu|cuda: the torch build the image must have, asserted once torch is in and again at the end
# (a dependency could have replaced it). Every step takes the same four arguments.
#
# The steps are separate RUNs for the layer cache: torch (gigabytes) is not fetched again when
# the dependencies change, nor the dependencies when only the sources do (the Dockerfile copies
# the requirements before the deps step and the sources only before the project step).
set -eu

usage="usage: build_env.sh torch|deps|project PYTHON TORCH_INDEX_URL cpu|cuda"
if [ "$#" -ne 4 ]; then
    echo "$usage" >&2
    exit 2
fi
step=$1 python=$2 index_url=$3 torch_build=$4
venv=/opt/venv

case "$torch_build" in
    cpu) torch_check="assert torch.version.cuda is None, 'a CUDA build of torch in the CPU image'" ;;
    cuda) torch_check="assert torch.version.cuda, 'a CPU build of torch in the GPU image'" ;;
    *) echo "$usage" >&2; exit 2 ;;
esac

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH="$venv/bin:$PATH"

case "$step" in
    torch)
        "$python" -m venv "$venv"
        pip install --no-cache-dir --upgrade pip
        pip install --no-cache-dir --index-url "$index_url" \
            "torch==${TORCH_VERSION:?build arg TORCH_VERSION not set}" \
            "torchvision==${TORCHVISION_VERSION:?build arg TORCHVISION_VERSION not set}"
        python -c "import torch; $torch_check"
        ;;
    deps)
        pip install --no-cache-dir -c /src/torch-constraints.txt -c /src/constraints.txt \
            -r /src/requirements.txt
        ;;
    project)
        pip install --no-cache-dir --no-deps "/src[deploy,int8]"
        pip check
        python -c "import torch; $torch_check"
        python -c "import flower, worker.app, migrations"
        rollscan --help > /dev/null
        ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
