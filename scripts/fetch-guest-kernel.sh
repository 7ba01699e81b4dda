#!/usr/bin/env bash
# Fetches the guest kernel: Debian's linux-image-cloud-amd64 (its 8250 serial driver and
# initramfs support are built in, so the VM needs no modules). Downloads the .deb with
# `apt-get download` (through the machine's apt sources), extracts it with `dpkg -x`, and
# copies the kernel to $CACHE/vmlinuz.
#
#   scripts/fetch-guest-kernel.sh            # fetch when missing; prints the kernel's path
#   scripts/fetch-guest-kernel.sh --force    # fetch again
#
# CACHE: $PROVIDER_KERNEL_CACHE, else $XDG_CACHE_HOME/provider/kernel, else
# ~/.cache/provider/kernel. `provider vm` looks in the same place (or takes --kernel PATH).
set -euo pipefail

force=0
[[ "${1:-}" == "--force" ]] && force=1

cache="${PROVIDER_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/provider/kernel}"
if [[ -s "$cache/vmlinuz" && $force == 0 ]]; then
  echo "$cache/vmlinuz"
  exit 0
fi

for tool in apt-get apt-cache dpkg; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (a Debian-based host is needed)" >&2; exit 2; }
done

# The metapackage only depends on the versioned image package, which holds vmlinuz.
meta=linux-image-cloud-amd64
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z "$pkg" ]]; then
  echo "apt does not know $meta; running apt-get update" >&2
  apt-get update -qq
  pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[[ -n "$pkg" ]] || { echo "error: cannot resolve $meta to a kernel package" >&2; exit 2; }

work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg" >&2)
deb=$(ls "$work"/*.deb)
dpkg -x "$deb" "$work/x"
kernel=$(ls "$work"/x/boot/vmlinuz-* | head -n1)
[[ -s "$kernel" ]] || { echo "error: no vmlinuz in $deb" >&2; exit 2; }

mkdir -p "$cache"
cp "$kernel" "$cache/vmlinuz.tmp.$$"
echo "$pkg" > "$cache/version.tmp.$$"
mv "$cache/vmlinuz.tmp.$$" "$cache/vmlinuz"
mv "$cache/version.tmp.$$" "$cache/version"
echo "$cache/vmlinuz"
