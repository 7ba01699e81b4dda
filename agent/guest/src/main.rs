//! `provider-guest`: PID 1 inside the job's VM.
//!
//! The host builds the initramfs: this binary as `/init` and either the payload's rootfs
//! under `/rootfs`, or the kernel modules (`/modules`) for a payload image on a virtio disk,
//! mounted under an overlay with a writable disk ([`disk`]; the kernel command line says
//! which, [`boot`]). At boot it mounts proc, sys, dev (devtmpfs, devpts) and a tmpfs on
//! `/tmp` inside the payload root, brings `lo` up, opens the host channel (`/dev/ttyS1`,
//! raw, or a virtio-serial port, [`vport`]) and puts it out of the payload's reach
//! ([`lockdown`]), and chroots itself into the payload root, so every command, path and
//! transfer is relative to it. Then it answers the host's requests (run, upload,
//! download, poweroff) and carries
//! connections to its proxy listener (`127.0.0.1:3128`) to the host as channel streams.
//! Whatever happens it ends by powering the VM off. Its own messages go to the console
//! (`ttyS0`, the job's log).
//!
//! `unsafe` is allowed only for the system calls that std and nix do not wrap (`klogctl` in
//! [`klog`], the channel's `TIOCEXCL` and `prctl` in [`lockdown`], `finit_module` in
//! [`modules`], the interface-flag ioctls in [`setup`]) and for the payload's `pre_exec`
//! hook in [`serve`]; each block carries a `// SAFETY:` comment saying why it is sound
//! (`clippy::undocumented_unsafe_blocks` is denied workspace-wide). With `vm`, this is the only crate with `unsafe`; every other
//! crate is `#![forbid(unsafe_code)]`.

mod boot;
mod disk;
mod entry;
mod klog;
mod limits;
mod lockdown;
mod modules;
mod reaper;
mod serve;
mod setup;
mod squashfs;
mod vport;
mod warm;

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("provider-guest {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if std::process::id() != 1 {
        eprintln!("provider-guest: this is the VM's init (PID 1); it does not run on a host");
        return ExitCode::from(2);
    }
    match setup::setup() {
        Ok(tty) => {
            if let Err(e) = serve::serve(tty) {
                eprintln!("provider-guest: {e}");
            }
        }
        Err(e) => eprintln!("provider-guest: setup failed: {e}"),
    }
    setup::poweroff()
}
