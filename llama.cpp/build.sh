#!/bin/sh
# Build llama-cpp-python (pinned) from the package registry's sdist with 0001-token-qkv.patch
# applied to the llama.cpp it vendors, and install it into PYTHON's environment. The wheel is
# cached outside the checkout, keyed by the version and the patch's checksum, so only a machine's
# first build pays (libllama and ggml's CPU backend: many minutes on 2 cores).
#
#   sh llama.cpp/build.sh PYTHON          (make llama-cpp runs it with .venv's python)
#   STOCK=1 sh llama.cpp/build.sh PYTHON  the same build without the patch, cached only (make
#                                         llama-cpp-stock): the test that a stock build refuses
#                                         a precomputed file runs where it is cached
#   FIRSTLAYER_CACHE=DIR                  the cache's root (default ~/.cache/firstlayer)
#   LLAMA_CPP_JOBS=N                      compile jobs (default 2), run under nice
set -eu
PYTHON=${1:?usage: build.sh PYTHON}
VERSION=0.3.36
HERE=$(cd "$(dirname "$0")" && pwd)
PATCH="$HERE/0001-token-qkv.patch"
SHA=$(sha256sum "$PATCH" | cut -c1-12)
CACHE="${FIRSTLAYER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/firstlayer}/llama-cpp/$VERSION-$SHA"
if [ -n "${STOCK:-}" ]; then
    CACHE="$(dirname "$CACHE")/$VERSION-stock"
fi
# Only the CPU backend and the library: no examples, tests, tools, server or multimodal library.
FLAGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF"

wheel() { ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }

# llama.cpp's own Hugging Face converter, from the same sdist: `firstlayer convert DIR OUT.gguf`
# runs it (Python only, the patch changes nothing in it).
CONVERT="$(dirname "$CACHE")/convert-$VERSION"

if [ -z "$(wheel)" ] || [ ! -d "$CONVERT" ]; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$WORK"
    tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/llama_cpp_python-$VERSION"
fi
if [ ! -d "$CONVERT" ]; then
    mkdir -p "$WORK/convert"
    (cd "$SRC/vendor/llama.cpp" && cp -r convert_hf_to_gguf.py conversion gguf-py "$WORK/convert/")
    mkdir -p "$(dirname "$CONVERT")"
    mv "$WORK/convert" "$CONVERT"
fi
if [ -z "$(wheel)" ]; then
    echo "building llama-cpp-python $VERSION (once per machine; STOCK=${STOCK:-}) in $WORK"
    if [ -z "${STOCK:-}" ]; then
        patch --quiet -p1 -d "$SRC/vendor/llama.cpp" < "$PATCH"
    fi
    CMAKE_ARGS="$FLAGS ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="${LLAMA_CPP_JOBS:-2}" \
        nice -n 19 "$PYTHON" -m pip wheel --quiet --no-deps -w "$WORK/wheel" "$SRC"
    mkdir -p "$(dirname "$CACHE")"
    rm -rf "$CACHE.partial"
    mv "$WORK/wheel" "$CACHE.partial"
    mv "$CACHE.partial" "$CACHE"  # whole or absent: a build killed midway leaves no wheel
fi
if [ -n "${STOCK:-}" ]; then
    echo "cached $(wheel) (not installed)"
    exit 0
fi
# Its dependencies first (diskcache, jinja2, ...), then this build over any other of the version.
"$PYTHON" -m pip install --quiet "$(wheel)"
"$PYTHON" -m pip install --quiet --force-reinstall --no-deps "$(wheel)"
echo "installed $(basename "$(wheel)") from $CACHE"
