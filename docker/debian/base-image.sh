#!/usr/bin/env bash
# Make a Debian bookworm base image from Debian's packages alone, for a machine that
# reaches a Debian mirror but no image registry (CI). It stands in for python:3.11-slim
# and debian:bookworm-slim as the BASE_IMAGE build argument of fedmq's Dockerfiles.
#
#   docker/debian/base-image.sh NAME[:TAG]
#
# debootstrap (minbase) from the mirror this machine's apt uses (FEDMQ_DEBIAN_MIRROR
# overrides it), plus Python 3.11 with venv; apt inside the image uses this machine's
# Debian sources, and the image trusts the CA certificates this machine trusts beyond
# Debian's (e.g. a TLS-inspecting proxy's), so pip and apt work in builds as they do here.
# Then `docker import`. About 40 s; run as root.
set -euo pipefail

if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
name=$1
suite=bookworm
sites=$(apt-get indextargets --format '$(SITE) $(RELEASE) $(COMPONENT)' 'Created-By: Packages' |
    sort -u | awk -v s="$suite" '$2 == s || $2 == s "-updates" || $2 == s "-security"')
mirror=${FEDMQ_DEBIAN_MIRROR:-$(awk -v s="$suite" '$2 == s { print $1; exit }' <<<"$sites")}
[[ -n "$mirror" ]] || { echo "base-image: no $suite mirror in apt's sources; set FEDMQ_DEBIAN_MIRROR" >&2; exit 1; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"

# As in Docker's own Debian images: package scripts start no service inside a build.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
if [[ -z "${FEDMQ_DEBIAN_MIRROR:-}" && -n "$sites" ]]; then
    awk '{ print "deb " $1 " " $2 " " $3 }' <<<"$sites" >"$rootfs/etc/apt/sources.list"
fi
python3 - /etc/ssl/certs/ca-certificates.crt "$rootfs" <<'PY'
import re
import sys
from pathlib import Path

pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host, rootfs = Path(sys.argv[1]), Path(sys.argv[2])
known = set(pem.findall((rootfs / "etc/ssl/certs/ca-certificates.crt").read_text()))
extra = [c for c in pem.findall(host.read_text()) if c not in known] if host.exists() else []
for number, cert in enumerate(extra):
    (rootfs / f"usr/local/share/ca-certificates/host-{number}.crt").write_text(cert + "\n")
PY
chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*

tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$name" >/dev/null
echo "base-image: $name ($suite from $mirror)"
