#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the demo need when they are
# missing (a C compiler, pkg-config, OpenSSL headers and CLI, QEMU, a static busybox for
# the test image, `file`, python3 for the demo's upstream, depmod for the guest kernel's
# modules, mksquashfs and mkfs.ext4 for disk images), then caches the guest kernel, and
# checks the nightly toolchain and cargo-fuzz for the fuzz step.
# Used by .ci/run and scripts/demo.sh; a machine that has everything is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v depmod >/dev/null 2>&1 || missing+=(kmod)
command -v mksquashfs >/dev/null 2>&1 || missing+=(squashfs-tools)
# The OCI pull tests run the distribution registry on loopback.
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
# The discovery test builds NAT routers in network namespaces (ip netns, iptables MASQUERADE).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
[[ -x /bin/busybox ]] && file -L /bin/busybox 2>/dev/null | grep -q "statically linked" || missing+=(busybox-static file)
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# The guest kernel (Debian's linux-image-cloud-amd64) and its modules, cached once.
scripts/fetch-guest-kernel.sh >/dev/null

# The fuzz step of .ci/run: cargo-fuzz (from crates.io) on the nightly toolchain, which
# this machine kind carries beside stable; it cannot be downloaded here, so say so.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "the nightly toolchain is missing (rustup toolchain install nightly); the fuzz step needs it" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
