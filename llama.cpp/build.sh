#!/bin/sh
# Build llama-cpp-python (pinned) from the package registry's sdist with 0001-token-qkv.patch
# applied to the llama.cpp it vendors, and install it into PYTHON's environment, with llama.cpp's
# own llama-server from the same build tree as PYTHON's bin/llama-server. The wheel and the server
# are cached outside the checkout, keyed by the version and the patch's checksum, so only a
# machine's first build pays (libllama and ggml's CPU backend, then the server: many minutes on 2
# cores). Beside them, in stock/, libllama rebuilt with the patch taken back out (only the files it
# touches recompile): the test that a stock llama.cpp refuses a precomputed file loads it.
#
#   sh llama.cpp/build.sh PYTHON          (make llama-cpp runs it with .venv's python)
#   FIRSTLAYER_CACHE=DIR                  the cache's root (default ~/.cache/firstlayer)
#   LLAMA_CPP_JOBS=N                      compile jobs (default 2), run under nice
set -eu
PYTHON=${1:?usage: build.sh PYTHON}
VERSION=0.3.36
HERE=$(cd "$(dirname "$0")" && pwd)
PATCH="$HERE/0001-token-qkv.patch"
SHA=$(sha256sum "$PATCH" | cut -c1-12)
CACHE="${FIRSTLAYER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/firstlayer}/llama-cpp/$VERSION-$SHA"
# Only the CPU backend and the library in the wheel: no examples, tests, tools or multimodal library
# (llama-server is built after it, as a target of its own).
FLAGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF"
FLAGS="$FLAGS -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF"

wheel() { ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }
built() {
    [ -n "$(wheel)" ] && [ -x "$CACHE/server/llama-server" ] && [ -f "$CACHE/stock/libllama.so" ]
}

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
    echo "building llama-cpp-python $VERSION with the patch (once per machine) in $WORK"
    patch --quiet -p1 -d "$SRC/vendor/llama.cpp" < "$PATCH"
    JOBS="${LLAMA_CPP_JOBS:-2}"
    CMAKE_ARGS="$FLAGS ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        nice -n 19 "$PYTHON" -m pip wheel --quiet --no-deps -w "$WORK/wheel" \
        --config-settings=build-dir="$WORK/build" "$SRC"
    # llama-server in the wheel's build tree: only its own sources compile (libllama, ggml and
    # common are built), cached with the libraries it links (the wheel's, and its own).
    nice -n 19 cmake "$WORK/build" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON > /dev/null
    nice -n 19 cmake --build "$WORK/build" --target llama-server -j "$JOBS" > /dev/null
    mkdir "$WORK/wheel/server"
    cp -P "$WORK/build/bin/llama-server" "$WORK/build/bin/"lib*.so* "$WORK/wheel/server/"
    # Stock libllama: the patch reversed in the same tree, only its files recompile; ggml is the
    # same (the patch touches none of it). Its RPATH is $ORIGIN: it loads the ggml beside it.
    patch --quiet -R -p1 -d "$SRC/vendor/llama.cpp" < "$PATCH"
    nice -n 19 cmake --build "$WORK/build" --target llama -j "$JOBS" > /dev/null
    mkdir "$WORK/wheel/stock"
    cp -P "$WORK/build/bin/"libllama.so* "$WORK/build/bin/"libggml*.so* "$WORK/wheel/stock/"
    mkdir -p "$(dirname "$CACHE")"
    rm -rf "$CACHE.partial"
    mv "$WORK/wheel" "$CACHE.partial"
    rm -rf "$CACHE"  # a wheel cached before the server and the stock library were
    mv "$CACHE.partial" "$CACHE"  # whole or absent: a build killed midway leaves no wheel
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
