#!/usr/bin/env bash
# Fetches the guest kernel: Debian's linux-image-cloud-amd64. Its 8250 serial driver, ext4
# and initramfs support are built in; virtio (PCI, block, console), squashfs and overlayfs
# are modules, which the disk-image boot path loads from the initramfs
# (docs/payload-runtime.md). Downloads the .deb with `apt-get download` (through the
# machine's apt sources), extracts it with `dpkg -x`, and puts into $CACHE:
#
#   vmlinuz            the kernel
#   version            the package it came from
#   modules/           -> modules-<release>/ (a symlink, swapped atomically)
#     order            the .ko file names below, one a line, in load order (dependencies
#                      first, per the package's modules.dep as depmod computes it)
#     release          the kernel release the modules are built for (`uname -r` in the VM)
#     *.ko             uncompressed: virtio_blk, virtio_console, virtio_pci, squashfs,
#                      overlay and what they depend on
#
#   scripts/fetch-guest-kernel.sh            # fetch when anything is missing; prints the kernel's path
#   scripts/fetch-guest-kernel.sh --force    # fetch again
#
# A cache from before the modules were cached (vmlinuz only) is fetched again, kernel and
# modules together, so the two always come from the same package.
#
# CACHE: $PROVIDER_KERNEL_CACHE, else $XDG_CACHE_HOME/provider/kernel, else
# ~/.cache/provider/kernel. `provider vm` looks in the same place (or takes --kernel PATH).
set -euo pipefail

# What the guest agent needs beyond the built-in drivers; their dependencies are added.
wanted=(virtio_pci virtio_blk virtio_console squashfs overlay)

force=0
[[ "${1:-}" == "--force" ]] && force=1

cache="${PROVIDER_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/provider/kernel}"

# Complete: the kernel, the module list, and every module it names.
complete() {
  [[ -s "$cache/vmlinuz" && -s "$cache/modules/order" && -s "$cache/modules/release" ]] || return 1
  local m
  while read -r m; do
    [[ -n "$m" && -s "$cache/modules/$m" ]] || return 1
  done < "$cache/modules/order"
}

if [[ $force == 0 ]] && complete; then
  echo "$cache/vmlinuz"
  exit 0
fi

for tool in apt-get apt-cache dpkg depmod; do
  command -v "$tool" >/dev/null || {
    hint="a Debian-based host is needed"
    [[ $tool == depmod ]] && hint="apt-get install kmod"
    echo "error: $tool not found ($hint)" >&2
    exit 2
  }
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

# The package ships no modules.dep (its postinst runs depmod on the installed system), so
# compute it for the extracted tree.
release=$(basename "$(ls -d "$work"/x/lib/modules/*/ | head -n1)")
[[ -n "$release" && -d "$work/x/lib/modules/$release/kernel" ]] || { echo "error: no modules in $deb" >&2; exit 2; }
depmod -b "$work/x" "$release"
moddir="$work/x/lib/modules/$release"

# modules.dep: "kernel/path/a.ko: kernel/path/dep1.ko kernel/path/dep2.ko", compressed
# modules ending .ko.xz, .ko.zst or .ko.gz. Key by module name (dashes read as underscores).
declare -A path_of deps_of
while IFS= read -r line; do
  file=${line%%:*}
  name=${file##*/}
  name=${name%%.ko*}
  name=${name//-/_}
  path_of[$name]=$file
  deps_of[$name]=${line#*:}
done < "$moddir/modules.dep"

# Depth first: a module goes after everything it depends on.
declare -A placed
order=()
place() {
  local name=$1 dep d
  [[ -n "${placed[$name]:-}" ]] && return 0
  [[ -n "${path_of[$name]:-}" ]] || { echo "error: module $name is not in $pkg (built in?)" >&2; exit 2; }
  placed[$name]=1
  for dep in ${deps_of[$name]}; do
    d=${dep##*/}
    d=${d%%.ko*}
    place "${d//-/_}"
  done
  order+=("$name")
}
for m in "${wanted[@]}"; do place "$m"; done

# Stage the new module directory next to its final place (same file system: renames are
# atomic), uncompressed, since finit_module of a compressed file needs a kernel built to
# decompress.
mkdir -p "$cache"
stage="$cache/modules-$release.tmp.$$"
rm -rf "$stage"
mkdir "$stage"
trap 'rm -rf "$work" "$stage"' EXIT
for name in "${order[@]}"; do
  src="$moddir/${path_of[$name]}"
  out="$stage/$name.ko"
  case "$src" in
    *.ko) cp "$src" "$out" ;;
    *.ko.xz) xz -dc "$src" > "$out" ;;
    *.ko.zst) zstd -qdc "$src" > "$out" ;;
    *.ko.gz) gzip -dc "$src" > "$out" ;;
    *) echo "error: unknown module file type: $src" >&2; exit 2 ;;
  esac
  echo "$name.ko" >> "$stage/order"
done
echo "$release" > "$stage/release"

cp "$kernel" "$cache/vmlinuz.tmp.$$"
echo "$pkg" > "$cache/version.tmp.$$"
rm -rf "$cache/modules-$release"
mv "$stage" "$cache/modules-$release"
# `modules` is a symlink so that swapping it is one rename; an old real directory (or an
# older release's tree) goes.
[[ -L "$cache/modules" || ! -e "$cache/modules" ]] || rm -rf "$cache/modules"
ln -s "modules-$release" "$cache/modules.tmp.$$"
mv -T "$cache/modules.tmp.$$" "$cache/modules"
mv "$cache/vmlinuz.tmp.$$" "$cache/vmlinuz"
mv "$cache/version.tmp.$$" "$cache/version"
for old in "$cache"/modules-*; do
  [[ "$old" == "$cache/modules-$release" || "$old" == *.tmp.* ]] || rm -rf "$old"
done
echo "$cache/vmlinuz"
