#!/usr/bin/env bash
# System packages some tests need: a real single-machine Slurm (slurmctld, slurmd, munge) for the Slurm
# tests, and an ssh server with pdsh for the ssh-style multi-node tests (launcher deepspeed over loopback).
# Best effort: without root or apt-get those tests skip and say why; everything else still runs.
set -uo pipefail
missing=()
command -v slurmctld >/dev/null && command -v munged >/dev/null || missing+=(slurmctld slurmd slurm-client munge)
[ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v pdsh >/dev/null || missing+=(openssh-server openssh-client pdsh)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: ${missing[*]} not installed and cannot be installed here (needs root and apt-get); the Slurm / ssh tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } \
    || echo "note: installing ${missing[*]} failed; the Slurm / ssh tests will skip"
exit 0
