#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package registry (issue 13): everything run_scripts/gpu_check.py needs that
# the machine's image lacks, for its Python 3.12 on x86-64 Linux, downloaded here into .whl/ (ignored by git).
#
#   bash run_scripts/gpu_wheels.sh            # from the repository root, where pip can reach PyPI
#
# The image has torch, transformers, accelerate, timm, numpy, pandas, pyarrow, xxhash, fsspec, aiohttp, psutil,
# py-cpuinfo, msgpack, einops, ninja, packaging, tqdm (docs/benchmarks.md, "GPU check"). It lacks datasets (+ dill,
# multiprocess), DeepSpeed (+ hjson, pydantic and its three helpers); versions are those the tests ran with here.
# fsspec and typing-extensions are brought too, at the versions datasets and pydantic ask for. pyarrow 24, the
# oldest datasets 5.2 takes, comes for the case the image's is older; the command installs it only then.
# DeepSpeed is an sdist on PyPI: it is built here as a pure-Python wheel (its CUDA ops are compiled on first use).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

WHEELS=.whl
LIMIT_BYTES=$((64 * 1024 * 1024))  # what one device call carries: the working tree and the wheels together
BINARY=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 typing-extensions==4.16.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
        pyarrow==24.0.0)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

git check-ignore -q "$WHEELS" || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"  # never committed
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$WHEELS" "${BINARY[@]}"
# Build isolation would download torch to build against; the local torch only serves the build script.
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8

tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
wheel_bytes=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
ls -l "$WHEELS"
echo "working tree $((tree_bytes / 1024)) KiB + wheels $((wheel_bytes / 1024)) KiB = $(((tree_bytes + wheel_bytes) / 1024)) KiB of $((LIMIT_BYTES / 1024)) KiB"
if ((tree_bytes + wheel_bytes > LIMIT_BYTES)); then
    echo "too large to carry: leave out pyarrow-*.whl if the machine's pyarrow is >= 24" >&2
    exit 1
fi
