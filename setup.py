"""Builds smca_kernels._C: the C++ CPU kernels always, the CUDA kernels when they can be built.
The package's metadata, dependencies and console scripts are in pyproject.toml.

CUDA is built when torch is a CUDA build and nvcc is found (CUDA_HOME), forced with FORCE_CUDA=1
and skipped with USE_CUDA=0. The architectures are TORCH_CUDA_ARCH_LIST's (e.g. "9.0" for an
H100); with none set and no GPU visible they default to "8.0;9.0". Install with
`pip install --no-build-isolation .` (`-e .` for a working copy) into an environment that has torch.
"""
import glob
import os
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    if os.environ.get("USE_CUDA", "1") == "0":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    libraries = []
    if not build_cuda():
        return CppExtension(
            "smca_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args=extra, extra_link_args=["-fopenmp"], py_limited_api=True,
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # pip's CUDA wheels put the headers torch includes (cusparse, cublas, ...) beside torch.
    wheel_include = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")
    if os.path.isdir(wheel_include):
        include_dirs.append(wheel_include)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    extra["cxx"] = cxx_flags + ["-DSMCA_WITH_CUDA"]
    extra["nvcc"] = ["-O3", "-std=c++20", "-DSMCA_WITH_CUDA", "--use_fast_math", "-lineinfo"]
    return CUDAExtension(
        "smca_kernels._C", sources, include_dirs=include_dirs, libraries=libraries,
        extra_compile_args=extra, extra_link_args=["-fopenmp"], py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
