#!/bin/sh
# Build llama-cpp-python (pinned) from the package registry's sdist with 0001-token-qkv.patch
# applied to the llama.cpp it vendors, and install it into PYTHON's environment, with llama.cpp's
# own llama-server from the same build tree as PYTHON's bin/llama-server. The wheel and the server
# are cached outside the checkout, keyed by the version and the patch's checksum, so only a
# machine's first build pays (libllama and ggml's CPU backend, then the server: many minutes on 2
# cores).
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
# Only the CPU backend and the library in the wheel: no examples, tests, tools or multimodal library
# (llama-server is built after it, as a target of its own).
FLAGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF"

wheel() { ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }
# The stock build is only ever loaded through Python; the patched one also serves llama-server.
built() { [ -n "$(wheel)" ] && { [ -n "${STOCK:-}" ] || [ -x "$CACHE/server/llama-server" ]; }; }

# llama.cpp's own Hugging Face converter, from the same sdist: `firstlayer convert DIR OUT.gguf`
# runs it (Python only, the patch changes nothing in it).
CONVERT="$(dirname "$CACHE")/convert-$VERSION"

if ! built || [ ! -d "$CONVERT" ]; then
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
if ! built; then
    echo "building llama-cpp-python $VERSION (once per machine; STOCK=${STOCK:-}) in $WORK"
    if [ -z "${STOCK:-}" ]; then
        patch --quiet -p1 -d "$SRC/vendor/llama.cpp" < "$PATCH"
    fi
    JOBS="${LLAMA_CPP_JOBS:-2}"
    CMAKE_ARGS="$FLAGS ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        nice -n 19 "$PYTHON" -m pip wheel --quiet --no-deps -w "$WORK/wheel" \
        --config-settings=build-dir="$WORK/build" "$SRC"
    if [ -z "${STOCK:-}" ]; then
        # llama-server in the wheel's build tree: only its own sources compile (libllama, ggml
        # and common are built), cached with the libraries it links (the wheel's, and its own).
        nice -n 19 cmake "$WORK/build" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON > /dev/null
        nice -n 19 cmake --build "$WORK/build" --target llama-server -j "$JOBS" > /dev/null
        mkdir "$WORK/wheel/server"
        cp -P "$WORK/build/bin/llama-server" "$WORK/build/bin/"lib*.so* "$WORK/wheel/server/"
    fi
    mkdir -p "$(dirname "$CACHE")"
    rm -rf "$CACHE.partial"
    mv "$WORK/wheel" "$CACHE.partial"
    rm -rf "$CACHE"  # a wheel cached before the server was
    mv "$CACHE.partial" "$CACHE"  # whole or absent: a build killed midway leaves no wheel
fi
if [ -n "${STOCK:-}" ]; then
    echo "cached $(wheel) (not installed)"
    exit 0
fi
# Its dependencies first (diskcache, jinja2, ...), then this build over any other of the version.
"$PYTHON" -m pip install --quiet "$(wheel)"
"$PYTHON" -m pip install --quiet --force-reinstall --no-deps "$(wheel)"
# bin/llama-server beside python: the cached binary with its libraries (its build tree is gone).
SERVER="$(dirname "$PYTHON")/llama-server"
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
    "$CACHE/server" "$CACHE/server/llama-server" > "$SERVER"
chmod +x "$SERVER"
echo "installed $(basename "$(wheel)") from $CACHE"
