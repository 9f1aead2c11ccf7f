#!/usr/bin/env bash
# The external tools of the optional cross-checks (tests/conftest.py): dcm2niix (Debian package
# dcm2niix) and dciodvfy (Debian package dicom3tools). Debian 12 as root; idempotent: installs
# only what is missing and prints the versions in use, so a CI log shows what the checks ran with.
set -euo pipefail

missing=()
command -v dcm2niix >/dev/null || missing+=(dcm2niix)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)

if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]]; then
        echo "test-tools: installing ${missing[*]} needs root (apt-get)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if command -v dpkg-query >/dev/null; then
    dpkg-query -W -f 'test-tools: ${Package} ${Version}\n' dcm2niix dicom3tools
fi
command -v dcm2niix dciodvfy
