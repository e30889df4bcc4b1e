#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` for the two-process baseline (benchmarks/twoproc.py), from the
# llama.cpp source that llama-cpp-python's sdist vendors, into a folder outside the repository.
#   bash benchmarks/build_llama_server.sh            # -> ~/.cache/fineinfer-bench/llama.cpp/bin/llama-server
#   OUT=/some/dir JOBS=2 bash benchmarks/build_llama_server.sh
#   WITH_PYTHON=1 bash benchmarks/build_llama_server.sh   # also llama-cpp-python's server, in a
#       venv of its own: $OUT/venv/bin/python -m llama_cpp.server (another ~7 min build)
# GGML_NATIVE is off: a -march=native build died with "Illegal instruction" on this machine's CPU
# (the compile host's flags are not the run host's). About 7 min on 2 cores; run it with nice.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
OUT=${OUT:-$HOME/.cache/fineinfer-bench/llama.cpp}
JOBS=${JOBS:-$(nproc)}
PIP=${PIP:-python3 -m pip}
SRC=$OUT/src
mkdir -p "$OUT"
if [ -x "$OUT/bin/llama-server" ]; then
  echo "already built: $OUT/bin/llama-server"
else
  if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    $PIP download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$OUT/sdist"
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar -xzf "$OUT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$SRC" --strip-components=1
  fi
  cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
  cmake --build "$OUT/build" --config Release --target llama-server -j "$JOBS"
  mkdir -p "$OUT/bin"
  cp "$OUT/build/bin/llama-server" "$OUT/bin/llama-server"
  echo "built: $OUT/bin/llama-server"
fi
if [ "${WITH_PYTHON:-0}" = 1 ] && [ ! -e "$OUT/venv/.built" ]; then
  python3 -m venv "$OUT/venv"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "$OUT/venv/bin/pip" \
    install -q --no-binary llama-cpp-python "llama-cpp-python[server]==$VERSION"
  touch "$OUT/venv/.built"
  echo "built: $OUT/venv/bin/python -m llama_cpp.server"
fi
