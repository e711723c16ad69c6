"""What this CPU can run: its features, read once at load, and the LiteRT path that runs here.

Every ``CompiledModel`` of ai-edge-litert 2.x loads the GPU accelerator library
``libLiteRtWebGpuAccelerator.so`` while it creates its LiteRT environment, even when only
the CPU is asked for (2.2 and 2.3 load the model through a default environment of their
own, so no option of the Python API avoids it). That library was built for a newer CPU
than the rest of LiteRT and checks at load time ("go/sigill-fail-fast"):

    FATAL ERROR: This binary was compiled with lse enabled, but this feature is not
    available on this processor (go/sigill-fail-fast).

and then raises SIGILL. gemma-edge keeps LiteRT's native log off the terminal, so all a
user saw was ``Illegal instruction``. A Raspberry Pi 4 (Cortex-A72, ARMv8.0: ``fp asimd
evtstrm crc32 cpuid``) lacks most of what it checks; a Pi 5 (Cortex-A76, ARMv8.2) has all
of it. The plain ``Interpreter`` never loads that library, and runs fp32, int8 and int4
files on a Cortex-A72 (XNNPACK picks kernels without the dot-product instructions there):
measured under qemu-user with ai-edge-litert 2.1.6 and 2.3.0
(``benchmarks/arm64_check.sh``). So ``plan()`` sends such CPUs to the Interpreter.

``NEEDS`` is the table of those checks, copied from the strings of the wheels' library
(the same list in 2.1.6, 2.2.0 and 2.3.0), in the kernel's feature names. The x86_64 row
comes from the x86 wheel's strings alone: no x86 CPU without AVX was run (numpy 2.4 itself
stops with SIGILL on qemu's Westmere model).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

from .errors import GemmaEdgeError

# The features libLiteRtWebGpuAccelerator.so checks before anything else runs, as
# LiteRT names them -> the name(s) Linux gives them in /proc/cpuinfo.
NEEDS = {
    "aarch64": {
        "aes": ("aes",), "lse": ("atomics",), "crc": ("crc32",), "dotprod": ("asimddp",),
        "fp16": ("fphp", "asimdhp"), "rdm": ("asimdrdm",), "rcpc": ("lrcpc",), "sha2": ("sha2",),
    },
    "x86_64": {
        "aes": ("aes",), "avx": ("avx",), "mmx": ("mmx",), "pclmul": ("pclmulqdq",),
        "popcnt": ("popcnt",), "sse": ("sse",), "sse2": ("sse2",), "sse3": ("pni",),
        "sse4.1": ("sse4_1",), "sse4.2": ("sse4_2",), "ssse3": ("ssse3",), "cmpxchg16b": ("cx16",),
    },
}

# Without these no LiteRT CPU kernel runs at all (XNNPACK's and the builtin kernels' baseline).
BASELINE = {"aarch64": ("asimd",), "x86_64": ("sse2",)}

# arm64 AT_HWCAP / AT_HWCAP2 bits (linux/arch/arm64/include/uapi/asm/hwcap.h) -> the
# /proc/cpuinfo name, so both sources give the same set.
HWCAP_BITS = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp",
              "asimdhp", "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4",
              "asimddp", "sha512", "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb",
              "paca", "pacg")
HWCAP2_BITS = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2",
               "frint", "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng",
               "bti", "mte", "ecv", "afp", "rpres", "mte3", "sme")
AT_HWCAP, AT_HWCAP2 = 16, 26

# The ARM cores a Pi-class board may have (MIDR part number, implementer 0x41).
ARM_PARTS = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
             0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
             0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd40: "Neoverse-V1", 0xd41: "Cortex-A78",
             0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd49: "Neoverse-N2",
             0xd4f: "Neoverse-V2"}

# What the int8/int4 kernels can use, for the one-line description.
SHOWN = {"aarch64": (("dot product", "asimddp"), ("i8mm", "i8mm"), ("fp16", "asimdhp"), ("bf16", "bf16"),
                     ("sve", "sve"), ("sme", "sme"), ("lse", "atomics")),
         "x86_64": (("avx2", "avx2"), ("fma", "fma"), ("avx512f", "avx512f"), ("avx512vnni", "avx512_vnni"),
                    ("avxvnni", "avx_vnni"), ("amx-int8", "amx_int8"))}


class UnsupportedCpuError(GemmaEdgeError):
    """No LiteRT path runs on this CPU: it lacks a feature every LiteRT CPU kernel needs."""


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # platform.machine(): "aarch64", "x86_64", ...
    features: frozenset  # the kernel's names, as in /proc/cpuinfo "Features" (arm64) or "flags" (x86)
    source: str  # where the features came from: "hwcap", "/proc/cpuinfo" or "none"
    model: str = ""  # "Raspberry Pi 4 Model B Rev 1.1", "Cortex-A72", "AMD EPYC", or ""

    def has(self, *names: str) -> bool:
        return all(n in self.features for n in names)

    def missing(self) -> tuple[str, ...]:
        """The LiteRT features (``NEEDS``) this CPU lacks, in the library's order."""
        needs = NEEDS.get(_arch(self.machine), {})
        return tuple(name for name, linux in needs.items() if not self.has(*linux))

    def describe(self) -> str:
        """One line: the machine, its model and what the int8/int4 kernels can use."""
        arch = _arch(self.machine)
        shown = ", ".join(f"{label} {'yes' if self.has(f) else 'no'}" for label, f in SHOWN.get(arch, ()))
        model = f" ({self.model})" if self.model else ""
        return f"{self.machine}{model}: {shown or 'features not known'} [from {self.source}]"


@dataclass(frozen=True)
class Plan:
    kind: str  # a make_backend kind: "auto" (CompiledModel if installed) or "interpreter"; or "unsupported"
    note: str  # one line saying what was chosen and why; "" when there is nothing to say
    missing: tuple[str, ...] = ()  # the features whose absence decided it
    reason: str = ""  # the note's first half: what this CPU lacks and what needs it

    def check(self) -> "Plan":
        """Raise UnsupportedCpuError when nothing runs here; else return the plan."""
        if self.kind == "unsupported":
            raise UnsupportedCpuError(self.note)
        return self


def _arch(machine: str) -> str:
    m = machine.lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)


def parse_cpuinfo(text: str, machine: str) -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo: the features every core has (a big.LITTLE
    chip may list different ones per core; the runtime may land on any of them). Only the
    lines of ``machine``'s kind count: arm64's "Features", x86's "flags" (under qemu-user an
    arm64 process reads the x86 host's file, which says nothing about the emulated CPU)."""
    arch = _arch(machine)
    feature_keys = {"aarch64": ("features",), "x86_64": ("flags",)}.get(arch, ("features", "flags"))
    model_keys = {"aarch64": ("model",), "x86_64": ("model name",)}.get(arch, ("model", "model name"))
    per_core, model, part = [], "", None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in feature_keys:
            per_core.append(set(value.split()))
        elif key in model_keys and not model and not value.isdigit():  # "Raspberry Pi 4 Model B Rev 1.1"
            model = value
        elif key == "cpu part" and part is None:
            try:
                part = int(value, 0)
            except ValueError:
                pass
    if not model and part in ARM_PARTS:
        model = ARM_PARTS[part]
    features = frozenset(set.intersection(*per_core)) if per_core else frozenset()
    return CpuInfo(machine, features, "/proc/cpuinfo" if per_core else "none", model)


def from_hwcap(hwcap: int, hwcap2: int = 0, machine: str = "aarch64", model: str = "") -> CpuInfo:
    """A CpuInfo from arm64's AT_HWCAP and AT_HWCAP2 words."""
    names = [n for i, n in enumerate(HWCAP_BITS) if hwcap >> i & 1]
    names += [n for i, n in enumerate(HWCAP2_BITS) if hwcap2 >> i & 1]
    return CpuInfo(machine, frozenset(names), "hwcap", model)


def _getauxval() -> tuple[int, int] | None:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.getauxval
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return int(fn(AT_HWCAP)), int(fn(AT_HWCAP2))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def detect() -> CpuInfo:
    """This machine's CPU, read once. On Linux arm64 the features come from the kernel's
    HWCAP words (what LiteRT's own checks read; under qemu-user they are the emulated CPU's,
    while /proc/cpuinfo is the host's); elsewhere from /proc/cpuinfo."""
    machine = platform.machine()
    from_file = parse_cpuinfo(_read("/proc/cpuinfo"), machine)
    if _arch(machine) == "aarch64" and platform.system() == "Linux":
        words = _getauxval()
        if words and words[0]:
            return from_hwcap(*words, machine=machine, model=from_file.model)
    return from_file


def plan(info: CpuInfo | None = None) -> Plan:
    """The LiteRT path for gemma-edge on this CPU (``detect()`` unless ``info`` is given).

    - ``auto``: nothing to avoid; the backend takes CompiledModel when installed.
    - ``interpreter``: the CPU lacks a feature ``NEEDS`` lists, so any CompiledModel would
      die with SIGILL: the plain Interpreter runs every file (fp32, int8, int4) instead.
    - ``unsupported``: the CPU lacks what every LiteRT CPU kernel needs; ``check()`` raises.
    """
    info = info or detect()
    arch = _arch(info.machine)
    if arch not in NEEDS or not info.features:
        return Plan("auto", "")  # nothing known to avoid here
    base = [f for f in BASELINE[arch] if not info.has(f)]
    if base:
        reason = f"this {info.machine} CPU{_named(info)} lacks {', '.join(base)}, which every LiteRT CPU kernel needs"
        return Plan("unsupported",
                    f"{reason}: no LiteRT path runs here. Run gemma-edge on a machine that has it "
                    f"(any {arch} CPU from the last decade does), or pack the file for LiteRT-LM on a phone "
                    "(gemma-edge pack)", tuple(base), reason)
    missing = info.missing()
    if not missing:
        return Plan("auto", "")
    dot = ("; int8/int4 weights use kernels without dot-product instructions"
           if arch == "aarch64" and not info.has("asimddp") else "")
    reason = (f"this CPU{_named(info)} lacks {', '.join(missing)}, which LiteRT's GPU accelerator library "
              "(loaded by every CompiledModel) requires")
    return Plan("interpreter", f"{reason}; running through the Interpreter instead (KV cache copied per call, "
                f"slower){dot}", missing, reason)


def _named(info: CpuInfo) -> str:
    return f" ({info.model})" if info.model else ""


def main() -> None:
    """``python -m gemma_edge.runtime.cpu_features``: what was detected and the plan."""
    info = detect()
    p = plan(info)
    print(info.describe())
    print(f"plan: {p.kind}" + (f": {p.note}" if p.note else ""))
    if os.environ.get("GEMMA_EDGE_DEBUG"):
        print("features:", " ".join(sorted(info.features)))


if __name__ == "__main__":
    main()
