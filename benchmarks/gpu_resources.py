"""The GPU kernels compiled for real GPU targets on a machine without a GPU, and what each
compiled kernel uses: registers, shared memory, local memory (spills) and its tensor-core and FMA
instructions, read from the cubin with Triton's bundled cuobjdump.

Triton kernels: a stand-in driver (StandInDriver) reports a GPUTarget, so that Triton compiles to
PTX and a cubin with its bundled ptxas, and "loads" a cubin by reading it, so that the
autotuner's prune (smca_kernels.triton._common.autotune: configurations that do not fit the
GPU's shared memory, or that spill where another does not, are left out) runs as on that GPU.
The launchers themselves (smca_kernels.triton) run on meta tensors of the benchmark shapes
(docs/kernels.md: B 2, H 8, Nq 300, one level 25x38 or three levels, 4,997 keys) with their
launches recorded instead of run, so every kernel is compiled with exactly the arguments and
flags its launcher passes; then each launch is compiled in every autotuning configuration, and
its row says whether the prune keeps it.

CUDA kernels: the built extension's cubins (smca_kernels/_C*.so, one per architecture of
TORCH_CUDA_ARCH_LIST), function by function.

    python benchmarks/gpu_resources.py                       # every case; tables in runs/gpu_resources
    python benchmarks/gpu_resources.py --out benchmarks/results --jobs 2
    python benchmarks/gpu_resources.py --cases model --check  # the model's case; exit 1 on a fault

--check reports, and fails on: a compile error; a configuration kept for a GPU that exceeds its
shared memory, or that spills (local memory); a 16-bit kernel with tl.dot and no tensor-core
instruction (HGMMA on sm_90 where the dot's row tile is >= 64 and a warpgroup issues it, HMMA
otherwise), or a TF32 one with neither; and, for the CUDA extension, a tile kernel that spills or whose
16-bit or TF32 instantiation has no HMMA. tests/test_gpu_compile.py runs it in CI and plants a
fault of each kind.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import csv
import functools
import glob
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("gpu_resources compiles for GPUs: run it without TRITON_INTERPRET=1")
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from smca_kernels.triton._common import matmul_precision  # noqa: E402


ARCHS = (80, 90)
# name: (q dtype, torch.backends.cuda.matmul.fp32_precision during the launch)
PRECISIONS = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"),
              "fp32-tf32": (torch.float32, "tf32"), "fp32-ieee": (torch.float32, "ieee")}
HEAD_DIMS = (32, 64, 128)
# Which flag sets each case compiles: every flag alone, none and all ("full"), or what SMCA-DETR
# trains with (padding masks, multi-scale alpha, attention dropout), with and without key splits.
CASES = {
    "full": ("", "mask", "alpha", "dropout", "split", "mask+alpha+dropout+split"),
    "model": ("mask+alpha+dropout", "mask+alpha+dropout+split"),
}
MODEL = dict(head_dims=(32,), precisions=("bf16", "fp32-tf32", "fp32-ieee"))
# The kernels with tl.dot, and the block size that is the row count of their products (a
# warpgroup's wgmma needs >= 64 rows): queries in the forward and dq passes, keys in dk/dv.
DOT_ROWS = {"_forward_kernel": "BLOCK_M", "_dq_kernel": "BLOCK_M", "_dkdv_kernel": "BLOCK_N"}
COUNTED = ("HGMMA", "HMMA", "FFMA")
FIELDS = ("kernel", "arch", "precision", "head_dim", "flags", "config", "dot_rows", "registers", "shared_bytes",
          "local_bytes", *(c.lower() for c in COUNTED), "fits", "kept", "error")
CUDA_FIELDS = ("kernel", "arch", "precision", "head_dim", "registers", "static_shared_bytes", "local_bytes",
               *(c.lower() for c in COUNTED))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# Shared memory one block may use (the opt-in limit), by compute capability.
SHARED_MEMORY_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


class StandInDriver(DriverBase):
    """Triton's driver for a GPU that is not there: it names the target to compile for, and
    "loads" a compiled kernel by reading its cubin (registers, spills) and checking its shared
    memory against the GPU's (SHARED_MEMORY_PER_BLOCK), as the CUDA driver would; launching or
    benchmarking raises."""

    def __init__(self, arch: int):
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _StandInUtils(arch)
        self.launcher_cls = _NoLauncher

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton caches compiled kernels per device, and its target with them: one "device" per
        # architecture keeps sm_80's kernels apart from sm_90's in one process.
        return self.target.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=0):
        return divmod(self.target.arch, 10)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("no GPU: compile only")


class _StandInUtils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY_PER_BLOCK[self.arch], "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        """(module, function, registers, spills in 4-byte words, max threads), as the CUDA driver's."""
        resources = cubin_resources(cubin)
        return None, None, resources["registers"], resources["local_bytes"] // 4, 1024

    def unload_module(self, module):
        pass


class _NoLauncher:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("no GPU: compile only")


@contextlib.contextmanager
def compiling_for(arch: int):
    """Triton compiles for sm_`arch` inside (the active driver is a StandInDriver)."""
    config = triton.runtime.driver
    before = config._active
    config.set_active(StandInDriver(arch))
    try:
        yield
    finally:
        config._active = before


@contextlib.contextmanager
def recorded_launches():
    """Inside, a Triton launch (kernel[grid](...), autotuned or not) records (kernel, args,
    kwargs) in the yielded list instead of running; kwargs as the kernel's run gets them (the
    launch's keywords, grid and warmup)."""
    launches = []

    def record(self, *args, **kwargs):
        launches.append((self, args, kwargs))  # kwargs with the launch's grid and warmup=False

    with _patched(JITFunction, "run", record), _patched(Autotuner, "run", record):
        yield launches


@contextlib.contextmanager
def _patched(cls, name, value):
    before = getattr(cls, name)
    setattr(cls, name, value)
    try:
        yield
    finally:
        setattr(cls, name, before)


def launches(dtype: torch.dtype, head_dim: int, flags: Iterable[str]) -> list:
    """The Triton launches of one forward and backward at the benchmark shape, as recorded_launches
    gives them, on meta tensors (nothing is allocated or run)."""
    from smca_kernels.triton import coattention_backward, coattention_forward

    flags = set(flags)
    B, H, Nq, D = 2, 8, 300, head_dim
    shapes = [(50, 76), (25, 38), (13, 19)] if "alpha" in flags else [(25, 38)]
    L, S = sum(h * w for h, w in shapes), len(shapes)
    meta = dict(device="meta")
    q = torch.empty(B, H, Nq, D, dtype=dtype, **meta)
    k, v = (torch.empty(B, H, L, D, dtype=dtype, **meta) for _ in range(2))
    centers, precision = (torch.empty(B, H, Nq, S, 2, **meta) for _ in range(2))
    alpha = torch.empty(B, H, Nq, S, **meta) if "alpha" in flags else None
    mask = torch.zeros(B, L, dtype=torch.bool, **meta) if "mask" in flags else None
    dropout_p, seed = (0.1, torch.tensor(2**40 + 7)) if "dropout" in flags else (0.0, None)
    splits = 4 if "split" in flags else 1
    flat = [n for shape in shapes for n in shape]
    with recorded_launches() as recorded:
        out, out_levels, lse = coattention_forward(q, k, v, centers, precision, alpha, flat, mask, D**-0.5,
                                                   dropout_p, seed, num_splits=splits)
        saved = out_levels if alpha is not None else out.unsqueeze(3)
        coattention_backward(torch.empty_like(out), q, k, v, centers, precision, alpha, saved, lse, flat, mask,
                             D**-0.5, dropout_p, seed, num_splits=splits)
    return recorded


def _config_name(kwargs: dict, num_warps: int, num_stages: int) -> str:
    blocks = "x".join(str(kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_R") if b in kwargs)
    return f"{blocks} w{num_warps} s{num_stages}"


@functools.lru_cache(maxsize=None)
def cubin_resources(cubin: bytes) -> dict:
    """registers, local_bytes and the instruction counts (COUNTED) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _run(_tool("cuobjdump"), "--dump-resource-usage", f.name)
        sass = _run(_tool("cuobjdump"), "-sass", f.name)
    function = parse_resource_usage(usage)
    [(_, resources)] = function.items()
    return {**resources, **count_instructions(sass)}


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def parse_resource_usage(text: str) -> Dict[str, dict]:
    """cuobjdump --dump-resource-usage -> {function: {registers, static_shared_bytes, local_bytes}}
    (local memory: spills and local arrays; a kernel that spills has some)."""
    functions, name = {}, None
    for line in text.splitlines():
        found = re.match(r"\s*Function (\S+):", line)
        if found:
            name = found.group(1)
            continue
        if name and "REG:" in line:
            values = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            functions[name] = dict(registers=int(values["REG"]), static_shared_bytes=int(values["SHARED"]),
                                   local_bytes=int(values["LOCAL"]) + int(values.get("STACK", 0)))
            name = None
    return functions


def count_instructions(sass: str) -> dict:
    """How many HGMMA, HMMA and FFMA instructions a SASS listing holds (predicated ones too)."""
    opcodes = collections.Counter(
        re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_]*)", sass, re.M))
    return {c.lower(): opcodes[c] for c in COUNTED}


def triton_rows(arch: int, precision: str, head_dim: int, flag_sets: Iterable[str]) -> List[dict]:
    """One row per distinct compiled Triton kernel and configuration for sm_`arch`."""
    dtype, fp32_precision = PRECISIONS[precision]
    rows, seen = [], set()
    with compiling_for(arch), matmul_precision(fp32_precision):
        for flag_set in flag_sets:
            flags = [f for f in flag_set.split("+") if f]
            for kernel, args, kwargs in launches(dtype, head_dim, flags):
                for row in compile_rows(kernel, args, kwargs, arch, precision=precision, head_dim=head_dim,
                                        flags=flag_set or "none"):
                    key = (row["kernel"], row["config"], row.pop("hash", None))
                    if key not in seen:  # else: a flag this kernel does not take
                        seen.add(key)
                        rows.append(row)
    return rows


def compile_rows(kernel, args: tuple, kwargs: dict, arch: int, dot_rows: Optional[str] = None,
                 **labels) -> List[dict]:
    """Compiles one launch of `kernel` (a JITFunction, or an Autotuner in each of its
    configurations) for sm_`arch`, which must be the active target (compiling_for): a row per
    configuration with `labels`, its resources (cubin_resources), shared memory, whether it fits
    the GPU and whether the autotuner's prune keeps it, or the error that stopped it. dot_rows:
    the block parameter that is its products' row count (default: DOT_ROWS by name)."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    dot_rows = dot_rows or DOT_ROWS.get(fn.__name__, "")
    candidates, kept, prune_error = [None], [None], None
    if isinstance(kernel, Autotuner):
        candidates = kernel.configs
        try:
            kernel.nargs = dict(zip(kernel.arg_names, args))
            kept = kernel.prune_configs(kwargs)
        except Exception as error:  # noqa: BLE001  (reported on every configuration)
            kept, prune_error = [], _error_text(error)
        finally:
            kernel.nargs = None
    rows = []
    constexprs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    for candidate in candidates:
        launch = dict(constexprs, **(candidate.all_kwargs() if candidate else {}))
        row = dict(kernel=fn.__name__, arch=f"sm_{arch}", **labels,
                   config=_config_name(launch, launch.get("num_warps", 4), launch.get("num_stages", 3)),
                   dot_rows=launch.get(dot_rows, ""))
        try:
            compiled = fn.warmup(*args, **launch, grid=(1,))
        except Exception as error:  # noqa: BLE001  (a compile failure is a finding)
            rows.append(dict(row, error=_error_text(error)))
            continue
        if compiled.metadata.target.arch != arch:
            raise RuntimeError(f"{fn.__name__}: compiled for sm_{compiled.metadata.target.arch}, not sm_{arch}")
        shared = compiled.metadata.shared
        row.update(cubin_resources(compiled.asm["cubin"]), shared_bytes=shared,
                   fits=shared <= SHARED_MEMORY_PER_BLOCK[arch], kept=candidate in kept, hash=compiled.hash)
        row.pop("static_shared_bytes")  # Triton's shared memory is dynamic: shared_bytes
        if prune_error:
            row["error"] = f"prune: {prune_error}"
        rows.append(row)
    return rows


def _error_text(error: BaseException) -> str:
    """The error in one line: its last (a CompilationError's message follows the source lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:300] if lines else ''}"


def violations(rows: Iterable[dict]) -> List[str]:
    """What --check fails on, one line per fault."""
    found = []
    for row in rows:
        where = f"{row['kernel']} {row['arch']} {row['precision']} D{row['head_dim']} [{row['flags']}] {row['config']}"
        if row.get("error"):
            found.append(f"{where}: {row['error']}")
            continue
        if row["local_bytes"] > 0 and row["kept"]:
            found.append(f"{where}: kept, and spills ({row['local_bytes']} bytes of local memory)")
        if row["kept"] and not row["fits"]:
            found.append(f"{where}: kept for {row['arch']} but needs {row['shared_bytes']} bytes of shared memory "
                         f"(the GPU has {SHARED_MEMORY_PER_BLOCK[int(row['arch'][3:])]})")
        if row["dot_rows"] != "" and row["precision"] != "fp32-ieee":
            # 16-bit: wgmma (HGMMA) on sm_90 where a warpgroup (4 warps) has 64 rows, else
            # mma.sync (HMMA). TF32: either; wgmma takes no transposed TF32 operand, so Triton
            # uses mma.sync for products such as q k^T.
            warps = int(row["config"].split()[1][1:])
            wgmma = int(row["arch"][3:]) >= 90 and int(row["dot_rows"]) >= 64 and warps >= 4
            expected = ("HGMMA", "HMMA") if row["precision"] == "fp32-tf32" else ("HGMMA",) if wgmma else ("HMMA",)
            if not any(row[name.lower()] for name in expected):
                found.append(f"{where}: no tensor-core instruction ({' or '.join(expected)} expected; "
                             f"{row['hgmma']} HGMMA, {row['hmma']} HMMA, {row['ffma']} FFMA)")
    return found


# The CUDA extension's kernels that multiply tiles (csrc/cuda/coattention_cuda.cu), and the
# precision of each scalar_t (float: "fp32-tf32" where the kTf32 template argument is true).
CUDA_TILE_KERNELS = ("forward_kernel", "backward_dq_kernel", "backward_dkdv_kernel")
CUDA_PRECISIONS = {"BFloat16": "bf16", "Half": "fp16", "float": "fp32-ieee"}


def cuda_violations(rows: Iterable[dict]) -> List[str]:
    """What --check fails on in the CUDA extension: a kernel that spills, and a 16-bit or TF32 tile
    kernel without HMMA."""
    found = []
    for row in rows:
        where = f"CUDA {row['kernel']} {row['precision']} D{row['head_dim']} {row['arch']}"
        if row["local_bytes"] > 0:
            found.append(f"{where}: spills ({row['local_bytes']} bytes of local memory)")
        if row["kernel"] in CUDA_TILE_KERNELS and row["precision"] != "fp32-ieee" and row["hmma"] == 0:
            found.append(f"{where}: no HMMA ({row['ffma']} FFMA)")
    return found


def cuda_rows(library: Optional[str] = None) -> List[dict]:
    """One row per CUDA kernel and architecture of the built extension (its cubins); none when the
    extension was built without CUDA."""
    library = library or next(iter(glob.glob(str(ROOT / "smca_kernels" / "_C*.so"))), None)
    if library is None:
        return []
    listing = subprocess.run([_tool("cuobjdump"), "--list-elf", library], capture_output=True, text=True).stdout
    archs = sorted(set(re.findall(r"\.(sm_\d+)\.cubin", listing)))
    rows = []
    for arch in archs:
        usage = parse_resource_usage(_run(_tool("cuobjdump"), "--dump-resource-usage", "-arch", arch, library))
        sass = _run(_tool("cuobjdump"), "-sass", "-arch", arch, library)
        bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s+Function : |\Z)", sass, re.S))
        names = _demangle(list(usage))
        for mangled, resources in usage.items():
            # e.g. void smca::(anonymous namespace)::forward_kernel<c10::Half, 32, 64, 64>(c10::Half const*, ...)
            signature = re.match(r"(?:void )?([\w:]+)(?:<(.*?)>)?\(", names[mangled].replace("(anonymous namespace)", "_"))
            kernel = signature.group(1).split("::")[-1] if signature else mangled
            params = [p.strip() for p in signature.group(2).split(",")] if signature and signature.group(2) else []
            dtype = next((p.split("::")[-1] for p in params if not p.isdigit() and p not in ("true", "false")), "")
            head_dim = next((p for p in params if p.isdigit()), "")  # the tile kernels' first int is D
            precision = CUDA_PRECISIONS.get(dtype, dtype)
            if dtype == "float" and "true" in params:  # the tile kernels' kTf32
                precision = "fp32-tf32"
            rows.append(dict(kernel=kernel, arch=arch, precision=precision, head_dim=head_dim, **resources,
                             **count_instructions(bodies.get(mangled, ""))))
    return rows


def _demangle(names: List[str]) -> Dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def _write(path: Path, rows: List[dict], fields: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: List[dict]) -> str:
    """Per kernel, architecture and precision: configurations compiled and kept by the prune, and
    of the kept ones the most registers and shared memory, how many spill, and their tensor-core
    instructions (summed)."""
    lines = [f"{'kernel':<20}{'arch':<7}{'precision':<11}{'configs':>8}{'kept':>6}{'kept: max regs':>16}"
             f"{'max smem KB':>13}{'spilling':>10}{'tensor-core ops':>17}"]
    key = lambda r: (r["kernel"], r["arch"], r["precision"])  # noqa: E731
    for (kernel, arch, precision), group in itertools.groupby(sorted(rows, key=key), key=key):
        group = [r for r in group if not r.get("error")]
        kept = [r for r in group if r["kept"]]
        if not kept:
            continue
        lines.append(f"{kernel:<20}{arch:<7}{precision:<11}{len(group):>8}{len(kept):>6}"
                     f"{max(r['registers'] for r in kept):>16}{max(r['shared_bytes'] for r in kept) / 1024:>13.1f}"
                     f"{sum(r['local_bytes'] > 0 for r in kept):>10}{sum(r['hgmma'] + r['hmma'] for r in kept):>17}")
    return "\n".join(lines)


def _work(job):
    return triton_rows(*job)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", choices=sorted(CASES), default="full",
                        help="full: every precision, head dims 32/64/128 and flag set; model: "
                             f"{MODEL['precisions']}, head dim 32, the model's flags")
    parser.add_argument("--archs", type=int, nargs="*", default=list(ARCHS), choices=sorted(SHARED_MEMORY_PER_BLOCK),
                        metavar="ARCH", help="compute capabilities to compile the Triton kernels for, of "
                        f"{sorted(SHARED_MEMORY_PER_BLOCK)} (default: 80 90; none: only the CUDA extension's table)")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), help="default: by --cases")
    parser.add_argument("--head-dims", type=int, nargs="+", help="default: by --cases")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_resources",
                        help="folder for triton_resources.csv and cuda_resources.csv")
    parser.add_argument("--jobs", type=int, default=1, help="compiling processes")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA extension's table")
    parser.add_argument("--check", action="store_true", help="exit 1 on a compile error, spill, missing tensor-core "
                                                             "instruction or kept configuration that does not fit")
    args = parser.parse_args(argv)
    model = args.cases == "model"
    precisions = args.precisions or (MODEL["precisions"] if model else list(PRECISIONS))
    head_dims = args.head_dims or (MODEL["head_dims"] if model else HEAD_DIMS)
    # smaller head dims first; the table is rewritten as each job ends, so a long run that is
    # stopped keeps what it finished
    jobs = [(arch, p, d, CASES[args.cases]) for d in head_dims for arch in args.archs for p in precisions]
    rows = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for part in pool.map(_work, jobs):
            rows += part
            _write(args.out / "triton_resources.csv", rows, FIELDS)
    if jobs:
        print(f"triton {triton.__version__}, torch {torch.__version__}: {len(rows)} compiled kernels "
              f"-> {args.out / 'triton_resources.csv'}")
        print(summary(rows))
    cuda = [] if args.no_cuda else cuda_rows()
    if cuda:
        _write(args.out / "cuda_resources.csv", cuda, CUDA_FIELDS)
        print(f"\nCUDA extension: {len(cuda)} kernels -> {args.out / 'cuda_resources.csv'}")
        for row in cuda:
            if row["kernel"] in CUDA_TILE_KERNELS:
                print(f"  {row['kernel']:<24}{row['arch']:<7}{row['precision']:<11}D{row['head_dim']:<5}"
                      f"regs {row['registers']:>3}  local {row['local_bytes']:>4}  HMMA {row['hmma']:>5}  "
                      f"FFMA {row['ffma']:>5}")
    if args.check:
        found = violations(rows) + cuda_violations(cuda)
        for line in found:
            print("FAULT", line)
        if found:
            print(f"{len(found)} faults")
            return 1
        print("no faults")
    return 0


if __name__ == "__main__":
    sys.exit(main())
