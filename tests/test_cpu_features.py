"""cpu_features: what a CPU has, and the LiteRT path gemma-edge takes on it.

The samples are public facts: the /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72) and a
Raspberry Pi 5 (Cortex-A76) under Raspberry Pi OS (64-bit; serial numbers left out), the
HWCAP words qemu-user 7.2 gives its emulated cortex-a72 and cortex-a76 (measured with
getauxval inside benchmarks/arm64_check.sh's root), and the flags of the AMD EPYC this
project's CI runs on.
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys

import pytest

from gemma_edge.runtime import backend, cpu_features
from gemma_edge.runtime.cpu_features import (CpuInfo, Plan, UnsupportedCpuError, from_hwcap, parse_cpuinfo,
                                             plan)
from gemma_edge.runtime.errors import GemmaEdgeError
from gemma_edge.runtime.modelfile import read_info
from conftest import tiny_gemma3


def _cores(features: str, variant: str, part: str, revision: int, n: int = 4) -> str:
    return "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                   f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\n"
                   f"CPU revision\t: {revision}\n\n" for i in range(n))


PI4_FEATURES = "fp asimd evtstrm crc32 cpuid"
PI5_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
                "dcpop asimddp")
PI4_CPUINFO = (_cores(PI4_FEATURES, "0x0", "0xd08", 3)
               + "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n")
PI5_CPUINFO = (_cores(PI5_FEATURES, "0x4", "0xd0b", 1)
               + "Revision\t: c04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
PI4_HWCAP = 0x887  # fp asimd evtstrm crc32 cpuid
PI5_HWCAP = 0x119FFF
QEMU_A72_HWCAP, QEMU_A76_HWCAP = 0x8FB, 0x119FFB  # qemu's models: no evtstrm; its A72 has aes/sha/pmull
EPYC_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
    "extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt "
    "tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a "
    "misalignsse 3dnowprefetch osvw topoext cpuid_fault vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms "
    "invpcid avx512f avx512dq adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt "
    "xsavec xgetbv1 xsaves avx_vnni avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes "
    "vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm avx512_vp2intersect")
EPYC_CPUINFO = f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: {EPYC_FLAGS}\n\n"


def test_pi4_runs_through_the_interpreter():
    info = parse_cpuinfo(PI4_CPUINFO, "aarch64")
    assert info.features == frozenset(PI4_FEATURES.split()) and info.source == "/proc/cpuinfo"
    assert info.model == "Raspberry Pi 4 Model B Rev 1.1"
    p = plan(info)
    assert p.kind == "interpreter" and p.check() is p
    assert p.missing == ("aes", "lse", "dotprod", "fp16", "rdm", "rcpc", "sha2")  # all but crc
    assert "lse" in p.note and "Interpreter" in p.note and "Raspberry Pi 4" in p.note
    assert "dot-product" in p.note
    assert "dot product no" in info.describe() and "Raspberry Pi 4" in info.describe()


def test_pi5_keeps_the_compiled_model():
    info = parse_cpuinfo(PI5_CPUINFO, "aarch64")
    assert info.has("asimddp", "atomics", "asimdhp") and not info.has("i8mm")
    assert info.missing() == ()
    assert plan(info) == Plan("auto", "")
    assert "dot product yes" in info.describe() and "i8mm no" in info.describe()


@pytest.mark.parametrize("hwcap, text", [(PI4_HWCAP, PI4_FEATURES), (PI5_HWCAP, PI5_FEATURES)])
def test_hwcap_and_proc_cpuinfo_agree(hwcap, text):
    assert from_hwcap(hwcap).features == frozenset(text.split())
    assert plan(from_hwcap(hwcap)).kind == plan(parse_cpuinfo(_cores(text, "0x0", "0xd08", 3), "aarch64")).kind


def test_qemu_cpu_models():
    a72, a76 = from_hwcap(QEMU_A72_HWCAP), from_hwcap(QEMU_A76_HWCAP)
    assert a72.has("aes", "sha2", "crc32") and not a72.has("atomics")  # qemu's A72 has crypto, a Pi 4 not
    p = plan(a72)
    assert p.kind == "interpreter" and p.missing == ("lse", "dotprod", "fp16", "rdm", "rcpc")
    assert plan(a76).kind == "auto"
    assert from_hwcap(0, 1 << 13).features == {"i8mm"} and from_hwcap(0, 1 << 23).features == {"sme"}


def test_model_from_the_cpu_part_when_the_board_has_no_model_line():
    info = parse_cpuinfo(_cores(PI4_FEATURES, "0x0", "0xd08", 3), "aarch64")
    assert info.model == "Cortex-A72" and "(Cortex-A72)" in plan(info).note


def test_big_little_takes_what_every_core_has():
    # constructed: two cores that differ (the runtime may be scheduled on either)
    text = _cores(PI5_FEATURES, "0x4", "0xd0b", 1, n=1) + _cores(PI4_FEATURES, "0x0", "0xd08", 3, n=1)
    info = parse_cpuinfo(text, "aarch64")
    assert info.features == frozenset(PI4_FEATURES.split()) and plan(info).kind == "interpreter"


def test_x86():
    info = parse_cpuinfo(EPYC_CPUINFO, "x86_64")
    assert info.model == "AMD EPYC" and info.has("avx2", "avx512_vnni")
    assert plan(info) == Plan("auto", "")
    assert "avx512vnni yes" in info.describe()
    # constructed: the same CPU without AVX (pre-2011 x86), which LiteRT's GPU library checks for
    old = dataclasses.replace(info, features=info.features - {"avx", "avx2", "avx512f"})
    p = plan(old)
    assert p.kind == "interpreter" and p.missing == ("avx",) and "dot-product" not in p.note


def test_nothing_runs_without_the_simd_baseline():
    # constructed: an arm64 core without Advanced SIMD; every LiteRT CPU kernel needs it
    info = CpuInfo("aarch64", frozenset({"fp", "cpuid"}), "hwcap", "Cortex-X")
    p = plan(info)
    assert p.kind == "unsupported" and p.missing == ("asimd",)
    with pytest.raises(UnsupportedCpuError, match="lacks asimd") as e:
        p.check()
    assert isinstance(e.value, GemmaEdgeError) and "Cortex-X" in str(e.value)


@pytest.mark.parametrize("info", [
    CpuInfo("riscv64", frozenset({"rv64imafdc"}), "/proc/cpuinfo"),  # nothing known to avoid
    CpuInfo("aarch64", frozenset(), "none"),  # features unknown: no reason to leave the default
    parse_cpuinfo(EPYC_CPUINFO, "aarch64"),  # qemu-user: an arm64 process reads the x86 host's file
])
def test_unknown_means_the_default_path(info):
    assert plan(info) == Plan("auto", "")


def test_an_x86_file_says_nothing_about_an_arm64_cpu():
    info = parse_cpuinfo(EPYC_CPUINFO, "aarch64")
    assert info.features == frozenset() and info.model == "" and info.source == "none"


def test_this_machine():
    info = cpu_features.detect()
    assert info.machine == platform.machine()
    baseline = cpu_features.BASELINE.get(cpu_features._arch(info.machine))
    if baseline and platform.system() == "Linux":
        assert info.has(*baseline), info.describe()
        assert plan().kind in ("auto", "interpreter")
    out = subprocess.run([sys.executable, "-m", "gemma_edge.runtime.cpu_features"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0] == info.describe() and out[1].startswith(f"plan: {plan(info).kind}")


@pytest.mark.skipif(not hasattr(backend, "_cpu_kind"), reason="the backend hook (cpu_features.plan in "
                    "make_backend) is not in runtime/backend.py yet")
def test_make_backend_follows_the_plan(tmp_path_factory, sp_model_path, monkeypatch, capsys):
    info = read_info(str(tiny_gemma3(tmp_path_factory, sp_model_path).model_file))
    monkeypatch.setattr(cpu_features, "detect", lambda: parse_cpuinfo(PI4_CPUINFO, "aarch64"))
    b = backend.make_backend(info, 1)
    assert isinstance(b, backend.InterpreterBackend)
    assert "Raspberry Pi 4" in capsys.readouterr().err
    assert b.decode(1, 0).shape == (info.config.vocab_size,)
    with pytest.raises(GemmaEdgeError, match="compiled backend cannot run here: .* lacks aes, lse"):
        backend.make_backend(info, 1, kind="compiled")
    monkeypatch.setattr(cpu_features, "detect", lambda: CpuInfo("aarch64", frozenset({"fp"}), "hwcap"))
    with pytest.raises(UnsupportedCpuError, match="lacks asimd"):
        backend.make_backend(info, 1, kind="interpreter")
    monkeypatch.setattr(cpu_features, "detect", lambda: parse_cpuinfo(PI5_CPUINFO, "aarch64"))
    assert isinstance(backend.make_backend(info, 1, weight_cache=False), backend.CompiledBackend)
    assert capsys.readouterr().err == ""
