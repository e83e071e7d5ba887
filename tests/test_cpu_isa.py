"""The C++ CPU kernels' ISA levels (csrc/cpu/isa.h): the choice and its override, the levels'
code kept to their own functions, and the sources building for aarch64. Every level's results
against the reference are in test_ops.py (test_matches_reference: every CPU case at every level)
and test_numeric_edges.py."""
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import smca_kernels as sk
from helpers import CPU_ISAS

ROOT = Path(__file__).resolve().parents[1]


def test_isa_choice_follows_smca_cpu_isa(monkeypatch):
    supported = torch.ops.smca._cpu_isas()
    assert supported[-1] == "default" and set(supported) <= set(CPU_ISAS)
    if platform.machine() == "x86_64":
        flags = Path("/proc/cpuinfo").read_text()
        assert ("avx512" in supported) == all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
        assert ("avx2" in supported) == all(f in flags for f in ("avx2", "fma"))
    monkeypatch.delenv("SMCA_CPU_ISA", raising=False)
    assert torch.ops.smca._cpu_isa() == supported[0]  # the widest
    monkeypatch.setenv("SMCA_CPU_ISA", "auto")
    assert torch.ops.smca._cpu_isa() == supported[0]
    for isa in supported:
        monkeypatch.setenv("SMCA_CPU_ISA", isa)
        assert torch.ops.smca._cpu_isa() == isa


def test_isa_names_are_read_in_any_case(monkeypatch):
    for isa in torch.ops.smca._cpu_isas():
        monkeypatch.setenv("SMCA_CPU_ISA", isa.upper())
        assert torch.ops.smca._cpu_isa() == isa


@pytest.mark.parametrize("value", ["sse9", "avx-512", "avx512 "])
def test_unknown_isa_is_refused_before_any_output(value, monkeypatch):
    monkeypatch.setenv("SMCA_CPU_ISA", value)
    with pytest.raises(ValueError, match=rf"SMCA_CPU_ISA={re.escape(value)}: not an ISA level; expected auto or one of: "):
        torch.ops.smca._cpu_isa()
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="SMCA_CPU_ISA"):
        sk.gaussian_coattention(q, torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8), torch.rand(1, 1, 2, 2),
                                torch.rand(1, 1, 2, 2), (2, 3), backend="cpu")


def test_isa_this_cpu_lacks_is_refused(monkeypatch):
    missing = [isa for isa in CPU_ISAS if isa not in torch.ops.smca._cpu_isas()]
    if not missing:
        pytest.skip("this CPU runs every level")
    monkeypatch.setenv("SMCA_CPU_ISA", missing[0])
    with pytest.raises(ValueError, match=rf"SMCA_CPU_ISA={missing[0]}: this CPU or build does not support it"):
        torch.ops.smca._cpu_isa()


def test_fma_peak_runs_at_every_level(monkeypatch):
    """The benchmark's peak (a rate: what it is is the benchmark's to show, not a test's)."""
    for isa in torch.ops.smca._cpu_isas():
        monkeypatch.setenv("SMCA_CPU_ISA", isa)
        peak = torch.ops.smca._cpu_fma_peak_gflops()
        assert 0 < peak < float("inf"), isa


def _functions_using(library: Path, instruction: re.Pattern) -> set:
    """Demangled names of the functions of `library` with an instruction matching `instruction`."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(library)],
                             capture_output=True, text=True, check=True).stdout
    names, function = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and instruction.search(line):
            names.add(function)
    return names


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 levels")
def test_wide_instructions_only_in_their_levels_functions():
    """The levels are compiled in one library, each after a target pragma (csrc/cpu/isa.h): an
    inline function of torch or the standard library emitted with AVX instructions could be the
    copy the linker keeps, and crash a CPU without them. So every function with a VEX or EVEX
    instruction must be one of ours, in the level's namespace."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    library = Path(sk._C.__file__)
    vex = _functions_using(library, re.compile(r"\t(v[a-z0-9]+|k(mov|and|or|not)[bwdq]?)\s"))
    own = re.compile(r"^(void |double |float )?smca::cpu::(avx2|avx512)::")
    assert vex, "no AVX code at all: the levels were not built"
    assert not [name for name in vex if not own.match(name)]
    zmm = _functions_using(library, re.compile(r"%zmm|%k[1-7]"))
    assert zmm and not [name for name in zmm if "smca::cpu::avx512::" not in name.split("(")[0]]


def _torch_includes() -> list:
    base = Path(torch.__file__).parent / "include"
    return ["-I", str(base), "-I", str(base / "torch" / "csrc" / "api" / "include")]


def test_cpu_sources_build_for_aarch64(tmp_path):
    """csrc/cpu compiles for aarch64 (Graviton, Apple silicon under Linux) against the installed
    torch headers: the x86 levels drop out, the baseline takes NEON (its multiply-adds are
    fmla). CI installs Debian's g++-aarch64-linux-gnu (.ci/run); elsewhere the test skips
    without it."""
    compiler = shutil.which("aarch64-linux-gnu-g++")
    if compiler is None:
        if os.environ.get("SMCA_REQUIRE_AARCH64_BUILD") == "1":
            pytest.fail("aarch64-linux-gnu-g++ not found (.ci/run installs it)")
        pytest.skip("aarch64-linux-gnu-g++ not installed (Debian: g++-aarch64-linux-gnu)")
    sources = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    jobs = [
        subprocess.Popen([compiler, "-std=c++20", "-O2", "-fopenmp", "-fPIC", "-DNDEBUG", "-I", str(ROOT / "csrc"),
                          *_torch_includes(), "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for source in sources
    ]
    for source, job in zip(sources, jobs):
        output = job.communicate()[0]
        assert job.returncode == 0, f"{source.name}:\n{output[-3000:]}"
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        listing = subprocess.run([objdump, "-d", str(tmp_path / "kernels_default.o")], capture_output=True,
                                 text=True, check=True).stdout
        assert re.search(r"\tfmla\s+v\d+\.4s", listing), "the baseline level is not vectorised with NEON"
