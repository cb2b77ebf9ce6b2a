#!/usr/bin/env bash
# Create (or refresh) the benchmark virtual environment bench/.venv.
#
# The benchmark needs the peers (dask.distributed, ray, loky) and plotting
# libraries, none of which the library itself depends on, so they live in a
# separate environment rather than the developer's.
#
# Idempotent: when every package is already importable and fastdist is
# up to date with the source tree, it returns in about a second.
#
# Environment:
#   BENCH_PYTHON        interpreter used to create the venv (default: python3)
#   BENCH_SKIP_FASTDIST=1  do not (re)install fastdist from the repo
#   BENCH_FORCE=1       reinstall everything
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="$HERE/.venv"
PY="${BENCH_PYTHON:-python3}"
STAMP="$VENV/.fastdist-src-stamp"

log() { echo "[setup_env] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV" || { log "venv creation failed"; exit 1; }
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel || true
fi
VPY="$VENV/bin/python"

# --- peers and helpers -------------------------------------------------------
# Each is installed separately so that one that cannot be installed does not
# stop the others; the runner reports a missing peer as "not installed".
declare -A MODULE_OF=(
    [numpy]=numpy
    [cloudpickle]=cloudpickle
    [loky]=loky
    ["dask[distributed]"]=distributed
    [ray]=ray
    [matplotlib]=matplotlib
    [psutil]=psutil
    [Cython]=Cython
    [setuptools]=setuptools
)
missing=()
if [ "${BENCH_FORCE:-0}" = 1 ]; then
    missing=("${!MODULE_OF[@]}")
else
    # One interpreter start checks every module (find_spec: no import cost).
    for pkg in "${!MODULE_OF[@]}"; do
        echo "$pkg ${MODULE_OF[$pkg]}"
    done >"$VENV/.wanted"
    while read -r pkg; do
        [ -n "$pkg" ] && missing+=("$pkg")
    done < <("$VPY" - "$VENV/.wanted" <<'PY'
import importlib.util, sys
for line in open(sys.argv[1]):
    pkg, mod = line.split()
    try:
        found = importlib.util.find_spec(mod) is not None
    except Exception:
        found = False
    if not found:
        print(pkg)
PY
)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    if ! "$VPY" -m pip install -q "${missing[@]}"; then
        log "batch install failed; trying one package at a time"
        for pkg in "${missing[@]}"; do
            "$VPY" -m pip install -q "$pkg" || log "WARNING: could not install $pkg"
        done
    fi
fi

# --- fastdist from the source tree -------------------------------------------
# Reinstall only when a source file is newer than the last install.
if [ "${BENCH_SKIP_FASTDIST:-0}" != 1 ]; then
    newest="$(find "$ROOT/src" "$ROOT/setup.py" "$ROOT/pyproject.toml" -type f \
        \( -name '*.py' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.toml' \) \
        -newer "$STAMP" 2>/dev/null | head -n 1)"
    if [ "${BENCH_FORCE:-0}" = 1 ] || [ ! -f "$STAMP" ] || [ -n "$newest" ] \
        || ! "$VPY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('fastdist') is None)" 2>/dev/null; then
        log "installing fastdist from the source tree"
        # Build from a copy of the tree: other work in the checkout is not
        # disturbed by build/ and egg-info directories, and vice versa.
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        touch "$STAMP.new"  # files changed from here on trigger the next rebuild
        tar -C "$ROOT" --exclude=./bench --exclude=./.git --exclude=./build \
            --exclude='*.egg-info' --exclude='*.so' -cf - . | tar -C "$tmp" -xf -
        buildlog="$VENV/fastdist-build.log"
        # Build with the venv's own setuptools/Cython (installed above): no
        # download per build.
        if "$VPY" -m pip install --no-build-isolation --no-deps --force-reinstall "$tmp" >"$buildlog" 2>&1; then
            mv "$STAMP.new" "$STAMP"
        else
            tail -n 5 "$buildlog" >&2
            log "WARNING: fastdist could not be installed (log: bench/.venv/fastdist-build.log);" \
                "the run will report it as failed"
        fi
    fi
fi
exit 0
