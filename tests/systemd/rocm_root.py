"""A Debian sid root with ROCm 7.2 from experimental: the toolchain the HIP build test uses.

Debian's archive carries ROCm 7.2.4 in experimental, and Debian's rocBLAS still ships gfx906
Tensile kernels, so llama.cpp's HIP backend compiles for gfx906 here, without a GPU. The recipe
is the one recorded by hand in ../shared/research/hip-build-debian.md: minbase sid, sid and
experimental in sources.list, and a pin that takes only the ROCm packages from experimental
(`apt-get -t experimental` would also pull libc6, perl, OpenSSL and cmake from there).

mi50d runs in the root from the repository (bind-mounted, PYTHONPATH), with its dependencies
from Debian's packages, so no pip (and no PyPI certificate) is needed inside.
"""

from __future__ import annotations

from tests.systemd.rootfs import MIRROR, Recipe

SOURCES = f"deb {MIRROR} sid main\ndeb {MIRROR} experimental main\n"
# Package-name globs taken from experimental; every other package comes from sid.
PINNED = ("hipcc", "libamdhip64*", "libhiprtc*", "libhsa-runtime*", "libamd-comgr*",
          "rocm-device-libs*", "libhipblas*", "librocblas*", "librocsolver*", "libroctx64*",
          "rocminfo", "rocm-*", "hip-*", "libhip*")
PIN = f"Package: {' '.join(PINNED)}\nPin: release a=experimental\nPin-Priority: 990\n"
ROCM_PACKAGES = ("hipcc", "libamdhip64-dev", "libhipblas-dev", "librocblas-dev", "rocminfo")
BUILD_PACKAGES = ("cmake", "make", "build-essential", "pkg-config", "file")
# mi50d's runtime dependencies (pyproject) as Debian packages; mi50ctl build-llama needs
# pydantic and click, the rest keeps `import mi50d.*` honest.
PYTHON_PACKAGES = ("python3", "python3-pydantic", "python3-click", "python3-uvloop")

RECIPE = Recipe(
    name="sid-rocm",
    suite="sid",
    apt_files={"etc/apt/sources.list": SOURCES,
               "etc/apt/preferences.d/rocm-experimental": PIN},
    install=ROCM_PACKAGES + BUILD_PACKAGES + PYTHON_PACKAGES,
)
# What a HIP build in this root depends on: the cache of that build is keyed by their versions.
TOOLCHAIN_PACKAGES = ("hipcc", "libamdhip64-dev", "libhipblas-dev", "librocblas-dev",
                      "librocblas5", "libhsa-runtime64-1", "libamd-comgr3", "rocm-device-libs-22",
                      "cmake", "g++", "clang-22")
