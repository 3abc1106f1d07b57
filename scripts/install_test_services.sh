#!/usr/bin/env bash
# System packages some tests need: a real single-machine Slurm (slurmctld, slurmd, munge) for the Slurm
# tests. Best effort: without root or apt-get those tests skip and say why; everything else still runs.
set -uo pipefail
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: Slurm is not installed and cannot be installed here (needs root and apt-get); the Slurm tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1; } \
    || echo "note: installing Slurm failed; the Slurm tests will skip"
exit 0
