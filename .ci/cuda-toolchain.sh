#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain (nvcc, headers, cuBLAS, cuRAND, NVRTC) from PyPI wheels
# into a folder, so that `cargo build --features cuda` (candle's CUDA backend) can be built on a
# machine without a GPU or a system CUDA. Then prints the environment to export.
#
#   .ci/cuda-toolchain.sh [DIR]        # default DIR: $HOME/.cache/cuda-13.0
#   eval "$(.ci/cuda-toolchain.sh)"   # install if needed and export
#
# Why 13.0: the GPU machines run driver 580 with CUDA 13.0; a newer nvcc's PTX may be refused.
# libcuda.so is a driver file that no wheel ships: a link-only stub is generated from the
# cu* symbols that the cudarc crate declares (run `cargo fetch` in a crate that depends on
# candle with the cuda feature first, so cudarc's source is in the cargo registry).
# The binary built this way needs the real libraries at run time; on the GPU machine:
#   LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib ./taper ...
# About 800 MB to download, 1.2 GB unpacked; a clean release build of candle's CUDA kernels
# takes ~20 minutes on 2 cores.
set -euo pipefail
D=${1:-$HOME/.cache/cuda-13.0}
T=$D/nvidia/cu13
if [ ! -x "$T/bin/nvcc" ]; then
  W=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$W" nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.10.0.20 nvidia-curand==10.4.4.72 >&2
  python3 -m pip install -q --no-deps --no-index --target "$D" "$W"/*.whl >&2
  rm -rf "$W"
  ln -sfn lib "$T/lib64"
  (cd "$T/lib" && for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done && ln -sf libcurand.so.10 libcurand.so)
fi
if [ ! -f "$T/lib/stubs/libcuda.so" ]; then
  src=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$src" ]; then
    echo "cudarc's source is not in the cargo registry yet: run 'cargo fetch' with the cuda feature first" >&2
    exit 1
  fi
  mkdir -p "$T/lib/stubs"
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*(' "$src" | sed 's/pub unsafe fn \(cu[A-Za-z0-9_]*\)(/int \1(void){return 999;}/' | sort -u > "$T/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$T/lib/stubs/libcuda.so" "$T/lib/stubs/libcuda_stub.c"
fi
echo "export PATH=$T/bin:\$PATH CUDA_HOME=$T CUDA_ROOT=$T CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$T/lib/stubs:$T/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
