#!/usr/bin/env bash
# Wheels for what the GPU image lacks (it has torch, numpy, safetensors, tokenizers, rich, PyYAML, ninja,
# psutil, py-cpuinfo, msgpack, einops, tqdm), into .whl/ for the device tool's `carry`; see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir .whl
# pydantic-core is compiled per Python version: fetch it for each one the image may have, and let
# `pip install --no-index --find-links .whl` there pick the one that fits.
for version in 3.10 3.11 3.12 3.13 3.14; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    omegaconf==2.4.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
done
# DeepSpeed ships only an sdist; its wheel is pure Python (ops are compiled on first use).
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
