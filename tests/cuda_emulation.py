"""Builds csrc/cuda/coattention_cuda.cu for the CPU through cuda_emulation.h, so that the tests run
the CUDA kernels' own code (tiles, level and split bookkeeping, masks, dropout, shuffles and
barriers) without a GPU. test_cuda_emulated.py uses it.

The source is rewritten as text: the CUDA headers and runtime calls go, every
`kernel<<<grid, block, smem, stream>>>(args)` becomes `emu::launch(kernel, grid, block, smem,
stream)(args)`, dynamic shared memory comes from the launch, and the op registration becomes a
Python module with `forward` and `backward` (the signatures of smca::_coattention_forward and
_backward). Every rewrite must find its text, so an edit of the .cu that defeats one fails here.

Under a sanitizer (the build and the tests, in a child process that preloads its runtime):
    python tests/cuda_emulation.py --sanitizer thread    # ThreadSanitizer: missing barriers
    python tests/cuda_emulation.py --sanitizer address   # AddressSanitizer + UBSan
    python tests/cuda_emulation.py --sanitizer thread -- -k splits   # pytest arguments after --
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "coattention_cuda.cu"
# name: (compiler flags, runtime libraries to preload, options)
SANITIZERS = {
    "thread": (["-fsanitize=thread"], ["libtsan.so"], {"TSAN_OPTIONS": "halt_on_error=1 report_signal_unsafe=0"}),
    # libstdc++ too, so that ASan's __cxa_throw interceptor finds it (torch throws while importing).
    "address": (["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"],
                ["libasan.so", "libstdc++.so"], {"ASAN_OPTIONS": "detect_leaks=0"}),
}
_DROPPED_INCLUDES = ("ATen/cuda/CUDAContext.h", "c10/cuda/CUDAException.h", "c10/cuda/CUDAGuard.h",
                     "cuda_runtime.h", "torch/library.h")
_REPLACEMENTS = (
    ("at::cuda::getCurrentDeviceProperties()", "emu::props()"),
    ("at::cuda::getCurrentCUDAStream()", "nullptr"),
    ("C10_CUDA_CHECK(", "emu::ignore("),
    ("C10_CUDA_KERNEL_LAUNCH_CHECK();", ""),
    ("const c10::cuda::CUDAGuard guard(q.device());", ""),
    ("TORCH_CHECK(q.is_cuda(),", "TORCH_CHECK(q.is_cpu(),"),
    ("extern __shared__ float smem[];", "float* smem = emu::dynamic_smem;"),
    ("__restrict__", ""),
)
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>()]*>)?)\s*<<<(.*?)>>>\(", re.S)
_REGISTRATION = "TORCH_LIBRARY_IMPL(smca, CUDA, m) {"
_MODULE = """}  // namespace smca

#include <torch/extension.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &smca::coattention_forward_cuda);
  m.def("backward", &smca::coattention_backward_cuda);
  m.def("widest_grid_y", [] { return emu::widest_grid_y; });
  m.def("reset_widest_grid_y", [] { emu::widest_grid_y = 0; });
  m.def("set_fragment_fault", [](bool on) { emu::fragment_fault = on; });
  m.def("to_tf32", [](float x) {  // the emulated cvt.rna.tf32.f32, as a float
    const uint32_t bits = to_tf32(x);
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  });
}
"""


def emulated_source() -> str:
    """The .cu rewritten as C++ for the emulation."""
    text = SOURCE.read_text()
    for header in _DROPPED_INCLUDES:
        line = f"#include <{header}>\n"
        if line not in text:
            raise RuntimeError(f"{SOURCE.name}: expected {line.strip()!r} to drop")
        text = text.replace(line, "")
    for old, new in _REPLACEMENTS:
        if old not in text:
            raise RuntimeError(f"{SOURCE.name}: expected {old!r} to rewrite")
        text = text.replace(old, new)
    launches = text.count("<<<")
    text, rewritten = _LAUNCH.subn(r"emu::launch(\1, \2)(", text)
    if rewritten != launches or launches == 0:
        raise RuntimeError(f"{SOURCE.name}: rewrote {rewritten} of {launches} kernel launches")
    if _REGISTRATION not in text:
        raise RuntimeError(f"{SOURCE.name}: expected {_REGISTRATION!r}")
    text = text[: text.index(_REGISTRATION)] + _MODULE
    return '#include "cuda_emulation.h"\n' + text


def build(sanitizer: Optional[str] = None):
    """The emulated kernels as a Python module, built (once) into build/<name>."""
    from torch.utils.cpp_extension import load

    name = "smca_cuda_emulated" + (f"_{sanitizer}" if sanitizer else "")
    build_dir = ROOT / "build" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / "coattention_emulated.cpp"
    text = emulated_source()
    if not source.exists() or source.read_text() != text:  # an unchanged file keeps ninja's build
        source.write_text(text)
    flags = SANITIZERS[sanitizer][0] if sanitizer else []
    # The sanitizer runtime was preloaded into this process (main); the compiler must not get it.
    os.environ.pop("LD_PRELOAD", None)
    return load(
        name=name, sources=[str(source), str(ROOT / "csrc" / "checks.cpp")],
        extra_include_paths=[str(ROOT / "tests"), str(ROOT / "csrc")],
        extra_cflags=["-O1", "-g", "-std=c++20"] + flags, extra_ldflags=flags,
        build_directory=str(build_dir),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sanitizer", choices=sorted(SANITIZERS), required=True)
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments after --, e.g. -- -k float32")
    args = parser.parse_args()
    _, runtimes, options = SANITIZERS[args.sanitizer]
    libraries = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                                check=True).stdout.strip() for name in runtimes]
    # Python is not instrumented: the runtime must be loaded before it, not with the extension.
    # One OpenMP thread: TSan cannot see libgomp's (uninstrumented) barriers in torch's own ops.
    env = dict(os.environ, LD_PRELOAD=":".join(libraries), SMCA_EMULATION_SANITIZER=args.sanitizer,
               OMP_NUM_THREADS="1", **options)
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",  # -s: reports reach stderr
               str(ROOT / "tests" / "test_cuda_emulated.py"), *args.pytest_args]
    return subprocess.run(command, env=env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
