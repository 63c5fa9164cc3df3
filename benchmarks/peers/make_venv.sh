#!/usr/bin/env bash
# Create a virtual environment for a peer library whose pins clash with qcal's.
# Usage: benchmarks/peers/make_venv.sh NAME 'pip requirement' ...   (e.g. llmcompressor 'llmcompressor==0.14.0.1')
# The venv lands in benchmarks/peers/.venv-NAME (git-ignored). torch is pinned to the CPU wheel first so that
# pip never resolves a CUDA build.
set -euo pipefail
name=$1; shift
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-$name"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q "$@"
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$venv/bin/python"
