#!/usr/bin/env bash
# Install the packages for the local two-node Slurm test cluster (tests/slurm/cluster.sh).
# Debian 12: slurm-wlm 22.05, slurmdbd + MariaDB for sacct, munge for auth. Needs root.
set -euo pipefail

PACKAGES="slurm-wlm slurmdbd munge mariadb-server"
export DEBIAN_FRONTEND=noninteractive

if command -v sbatch >/dev/null && command -v slurmdbd >/dev/null && command -v mysqld >/dev/null; then
    echo "install_slurm: already installed: $PACKAGES"
    exit 0
fi

echo "+ apt-get update"
apt-get update -q
echo "+ apt-get install -y --no-install-recommends $PACKAGES"
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold $PACKAGES
