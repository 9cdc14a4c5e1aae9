#!/usr/bin/env bash
# One short check on a machine with a real GPU (no package registries there): the binaries
# built elsewhere arrive in devrun/ with the Vulkan loader; this finds NVIDIA's Vulkan ICD,
# lists adapters, runs the kernel tests and `pals bench`, and PyTorch on the same card.
set -u
cd "$(dirname "$0")/.."
# The binaries travel compressed (the carry limit is 64 MiB).
[ -f devrun/devrun.tar.xz ] && tar xJf devrun/devrun.tar.xz
export LD_LIBRARY_PATH="$PWD/devrun${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PALS_CACHE_DIR="${OUT:-/tmp}/pals-cache" XDG_RUNTIME_DIR=/tmp
nvidia-smi -L
ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>&1
ldconfig -p | grep -E "libGLX_nvidia|libvulkan|libEGL_nvidia" | head
devrun/pals devices
# In containers libGLX_nvidia's Vulkan entry often fails ("Could not get vkCreateInstance");
# the same driver answers through libEGL_nvidia, headless. Point the loader there if needed.
if ! devrun/pals devices 2>/dev/null | grep -qi nvidia; then
  printf '{"file_format_version":"1.0.1","ICD":{"library_path":"libEGL_nvidia.so.0","api_version":"1.4.312"}}' \
    > /tmp/nvidia_egl_icd.json
  export VK_DRIVER_FILES=/tmp/nvidia_egl_icd.json VK_ICD_FILENAMES=/tmp/nvidia_egl_icd.json
  VK_LOADER_DEBUG=error devrun/pals devices
fi
devrun/pals devices | grep -qi nvidia || { echo "no NVIDIA Vulkan adapter"; exit 1; }
for test in devrun/tests/*; do
  echo "== $test"
  timeout 120 "$test" 2>&1 | grep -E "test result|FAILED|panicked|GPU tests run on" | head -8
done
timeout 240 devrun/pals bench
timeout 120 python3 scripts/torch_bench.py
