#!/usr/bin/env bash
# Install a local SLURM (Debian slurm-wlm) + munge for the SLURM integration tests.
#
# Idempotent and fast when already installed: it checks for the binaries first and only
# runs apt-get when one is missing. Needs root (or passwordless sudo) to install; the
# tests themselves (tests/support/slurm_cluster.py) start munged/slurmctld/slurmd from a temp
# folder and need no systemd.
set -euo pipefail

need=()
for bin in munged slurmctld slurmd sbatch scontrol; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        need+=("$bin")
    fi
done
if [ "${#need[@]}" -eq 0 ]; then
    echo "install_slurm: slurm-wlm and munge already installed ($(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo '?'))"
    exit 0
fi
echo "install_slurm: missing ${need[*]}; installing slurm-wlm munge"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install_slurm: not root and no sudo; cannot install" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Do not let the package scripts try to start services (no systemd in containers).
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge

# The munge key: the package normally creates /etc/munge/munge.key; make sure it exists
# with the right owner and mode (munged refuses a key readable by others).
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        $SUDO mungekey --create --force
    else
        $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
$SUDO chown munge:munge /etc/munge/munge.key
$SUDO chmod 0400 /etc/munge/munge.key
echo "install_slurm: done (slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || echo '?'))"
