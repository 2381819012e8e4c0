#!/usr/bin/env bash
# Gather, here, what tests/gpu/on_device.sh installs on a lent GPU machine, which has no
# package registry (Python 3.12 with torch, transformers, sentencepiece, numpy, pyarrow,
# pyyaml, tqdm, psutil, pytest already there): DeepSpeed as a pure-Python wheel (its ops
# build just in time with nvcc there) and the packages it needs that the machine lacks.
#   bash tests/gpu/wheels.sh        # in the project root; writes .whl/ (git-ignored)
set -eu
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do plat+=(--platform "$p"); done
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$@"; }
version() { .venv/bin/python -c "from importlib.metadata import version; print(version('$1'))"; }
.venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
dl hjson py-cpuinfo pytest-timeout "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic_core)" \
   annotated-types typing-inspection
du -sh .whl; ls .whl
