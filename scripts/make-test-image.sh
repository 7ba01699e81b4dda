#!/usr/bin/env bash
# Builds a small rootfs tarball for VM tests and trying `provider vm run`: Debian's static
# busybox as /bin/busybox with a symlink per applet (/bin/sh, /bin/echo, …), and the usual
# empty directories.
#
#   scripts/make-test-image.sh OUT.tar        # plain tar
#   scripts/make-test-image.sh OUT.tar.gz     # gzip
#
# Needs busybox-static (`apt-get install busybox-static`; .ci/run installs it).
# BUSYBOX=/path/to/busybox overrides which binary is packed.
set -euo pipefail

out="${1:?usage: make-test-image.sh OUT.tar[.gz]}"
bb="${BUSYBOX:-}"
if [[ -z "$bb" ]]; then
  for c in /bin/busybox /usr/bin/busybox; do
    [[ -x "$c" ]] && { bb="$c"; break; }
  done
fi
[[ -n "$bb" && -x "$bb" ]] || { echo "error: no busybox; apt-get install busybox-static" >&2; exit 2; }
if ! file -L "$bb" 2>/dev/null | grep -q "statically linked" && command -v file >/dev/null; then
  echo "error: $bb is not statically linked; install busybox-static" >&2
  exit 2
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,root,usr/bin,usr/sbin,var}
chmod 1777 "$root/tmp"
cp "$bb" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
for applet in $("$bb" --list); do
  [[ "$applet" == busybox ]] && continue
  ln -s busybox "$root/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"

flags=(--numeric-owner --owner=0 --group=0 --sort=name --mtime=@0)
case "$out" in
  *.tar.gz|*.tgz) tar -C "$root" "${flags[@]}" -czf "$out" . ;;
  *) tar -C "$root" "${flags[@]}" -cf "$out" . ;;
esac
echo "$out"
