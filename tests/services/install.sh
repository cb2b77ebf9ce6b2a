#!/usr/bin/env bash
# Install the system packages that the integration-test services need
# (sshd, Slurm + munge, ip, ps/pkill, OpenMPI and the headers that pip's mpi4py
# builds against: run this before installing the test extra). Idempotent: does
# nothing when all of them are already present, so it is cheap to call at the
# start of every run.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: must run as root" >&2
    exit 1
fi

# package -> a file it provides; the package is installed only if the file is missing
declare -A probe=(
    [openssh-server]=/usr/sbin/sshd
    [openssh-client]=/usr/bin/ssh
    [slurm-wlm]=/usr/sbin/slurmctld
    [munge]=/usr/sbin/munged
    [iproute2]=/usr/sbin/ip
    [procps]=/usr/bin/pkill
    [openmpi-bin]=/usr/bin/orterun
    [libopenmpi-dev]=/usr/lib/$(uname -m)-linux-gnu/openmpi/include/mpi.h
)

missing=()
for pkg in "${!probe[@]}"; do
    if [ ! -e "${probe[$pkg]}" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

echo "install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! apt-get update -qq >"$log" 2>&1; then
    cat "$log" >&2
    echo "install.sh: apt-get update failed" >&2
    exit 1
fi
if ! apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Use-Pty=0 "${missing[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    echo "install.sh: apt-get install ${missing[*]} failed" >&2
    exit 1
fi

# Debian's postinst scripts may start daemons; the tests start their own
# private instances, so stop any system-wide ones that were just launched.
for svc in ssh slurmctld slurmd munge; do
    if command -v service >/dev/null 2>&1; then
        service "$svc" stop >/dev/null 2>&1 || true
    fi
done

for pkg in "${missing[@]}"; do
    if [ ! -e "${probe[$pkg]}" ]; then
        echo "install.sh: $pkg installed but ${probe[$pkg]} is still missing" >&2
        exit 1
    fi
done
