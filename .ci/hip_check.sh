#!/usr/bin/env bash
# The HIP kernel (wkv7_hip.cpp) must compile for AMD GPUs: CDNA2 gfx90a (64-wide wavefronts) and RDNA3 gfx1100
# (32-wide). No AMD GPU is needed: device code only (-DWKV7_NO_TORCH leaves out the torch bindings and instantiates
# every kernel), -c, no link. Installs Debian's hipcc and libamdhip64-dev when hipcc is missing (Debian 12: ROCm
# 5.2.3, clang 15; 34 packages, ~78 MB download, ~1 min). Exits non-zero if the packages are missing or a build fails.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

if ! command -v hipcc >/dev/null; then
  start=$(date +%s)
  $SUDO apt-get update -qq
  for pkg in hipcc libamdhip64-dev; do
    policy=$(apt-cache policy "$pkg")
    [[ "$policy" == *"Candidate: "[0-9]* ]] || { echo "hip_check: package $pkg not available from apt"; exit 1; }
  done
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc libamdhip64-dev >/dev/null
  echo "hip_check: installed hipcc and libamdhip64-dev in $(( $(date +%s) - start )) s"
fi

export HIP_PLATFORM=amd  # hipcc would pick the NVIDIA platform where nvcc is installed
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
build() { hipcc -x hip --offload-arch="$1" -DWKV7_NO_TORCH -D_N_=64 -O3 -ffast-math -Wall -Werror -Wno-unused-command-line-argument "${@:2}" wkv7_hip.cpp; }
for arch in gfx90a gfx1100; do
  if build "$arch" -c -o "$out/wkv7_$arch.o" 2>"$out/err"; then
    echo "hip_check: wkv7_hip.cpp compiles for $arch"
  elif grep -q "cannot find ROCm device library for $arch" "$out/err"; then
    # Debian 12's ROCm 5.2 device libraries stop before gfx11: generate the GPU code alone, without them
    build "$arch" -nogpulib --cuda-device-only -S -o "$out/wkv7_$arch.s"
    echo "hip_check: wkv7_hip.cpp compiles to $arch machine code (device code only: no $arch device library here)"
  else
    cat "$out/err"
    exit 1
  fi
done
