#!/usr/bin/env bash
# Builds a GVMI (Golem's VM image format) from the busybox test rootfs, to prove the
# layout that docs/payload-runtime.md describes:
#
#   squashfs image | CRC-32 of the JSON (4 bytes, little-endian) | JSON | JSON length (8 ASCII digits)
#
# The JSON is a Docker ContainerConfig (Entrypoint, Cmd, Env, WorkingDir, User, Volumes…).
# The CRC is the usual CRC-32 (IEEE, as zlib and gzip compute it), taken here from gzip's
# own trailer, so the script needs no other tool. The script then reads the trailer back
# the way a reader would and checks it.
#
#   scripts/make-test-gvmi.sh OUT.gvmi                      # lzo, like stock GVMIs
#   COMP=zstd scripts/make-test-gvmi.sh OUT.gvmi            # any mksquashfs -comp
#   CONFIG='{"Cmd":["/bin/echo","hi"]}' scripts/make-test-gvmi.sh OUT.gvmi
#   ROOTFS=/path/to/dir scripts/make-test-gvmi.sh OUT.gvmi  # another tree
#
# Needs mksquashfs (squashfs-tools) and, without ROOTFS, what make-test-image.sh needs.
# The image can be given to the guest as is: squashfs ignores the bytes after its
# `bytes_used`, so the trailer rides along on the read-only disk.
set -euo pipefail

out="${1:?usage: make-test-gvmi.sh OUT.gvmi}"
comp="${COMP:-lzo}"
default_config='{"Cmd":["/bin/sh"],"Entrypoint":null,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Image":"provider-busybox-test","User":"","Volumes":{"/golem/work":{}},"WorkingDir":"/"}'
config="${CONFIG:-$default_config}"
command -v mksquashfs >/dev/null || { echo "error: no mksquashfs; apt-get install squashfs-tools" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

root="${ROOTFS:-}"
if [[ -z "$root" ]]; then
  "$here/make-test-image.sh" "$work/rootfs.tar" >/dev/null
  mkdir "$work/root"
  tar -C "$work/root" -xf "$work/rootfs.tar"
  root="$work/root"
  # The tarball's `.` carries mktemp's 0700; a root directory is 0755, or payloads that
  # run as another user cannot even reach /bin.
  chmod 755 "$root"
fi

mksquashfs "$root" "$work/image" -comp "$comp" -noappend -all-root -quiet -no-progress >/dev/null
sq_bytes=$(stat -c %s "$work/image")

printf '%s' "$config" > "$work/config.json"
len=$(stat -c %s "$work/config.json")
(( len <= 99999999 )) || { echo "error: the JSON is $len bytes; the length field holds 8 digits" >&2; exit 2; }
# gzip ends with CRC-32 (little-endian) and the input's size: the first 4 of the last 8.
gzip -c < "$work/config.json" | tail -c 8 | head -c 4 > "$work/crc"
{
  cat "$work/image" "$work/crc" "$work/config.json"
  printf '%08d' "$len"
} > "$work/out.gvmi"

# Read it back as a reader does, from the end.
total=$(stat -c %s "$work/out.gvmi")
got_len=$(tail -c 8 "$work/out.gvmi")
[[ "$got_len" =~ ^[0-9]{8}$ ]] || { echo "error: length field is not 8 digits: $got_len" >&2; exit 1; }
got_len=$((10#$got_len))
json_at=$((total - 8 - got_len))
crc_at=$((json_at - 4))
tail -c +$((json_at + 1)) "$work/out.gvmi" | head -c "$got_len" > "$work/json.back"
tail -c +$((crc_at + 1)) "$work/out.gvmi" | head -c 4 > "$work/crc.back"
cmp -s "$work/json.back" "$work/config.json" || { echo "error: JSON read back differs" >&2; exit 1; }
gzip -c < "$work/json.back" | tail -c 8 | head -c 4 | cmp -s - "$work/crc.back" \
  || { echo "error: CRC read back does not match the JSON" >&2; exit 1; }
[[ $crc_at == "$sq_bytes" ]] || { echo "error: squashfs ends at $sq_bytes, CRC found at $crc_at" >&2; exit 1; }
head -c 4 "$work/out.gvmi" | cmp -s - <(printf 'hsqs') || { echo "error: no squashfs magic" >&2; exit 1; }

mv "$work/out.gvmi" "$out"
crc_hex=$(od -An -tx4 -N4 "$work/crc" | tr -d ' ')
echo "$out: squashfs ($comp) 0..$sq_bytes, CRC-32 0x$crc_hex at $crc_at, JSON $got_len bytes at $json_at, length at $((total - 8)), $total bytes" >&2
echo "$out"
