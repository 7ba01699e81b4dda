//! Getting a guest to its first instruction: loading a bzImage or ELF vmlinux with the
//! Linux 64-bit boot protocol (zero page, command line, initramfs, identity page tables,
//! GDT, MP table), or a real-mode program; and the vCPU state each needs (registers,
//! CPUID, MSRs, FPU, local APIC).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::OnceLock;

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{self, BootParamsInput};
use super::KvmError;

/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags` (and with it a declared 64-bit entry).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;

/// Where a loaded guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode at this address, `rsi` = zero page.
    Linux64(u64),
    /// Real mode at `0000:REALMODE_LOAD_ADDR`.
    RealMode,
}

/// Reads and checks a bzImage's setup header: `HdrS` magic, boot protocol ≥ 2.12, loaded
/// high, and a 64-bit entry point. A kernel failing these could not be started by this
/// VMM, so it is refused before any guest memory is touched.
pub fn read_setup_header(path: &Path, file: &mut File) -> Result<setup_header, KvmError> {
    let bad = |reason: String| KvmError::BadBzImage {
        path: path.to_owned(),
        reason,
    };
    let io = |source| KvmError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let mut hdr = setup_header::default();
    file.seek(SeekFrom::Start(0x1f1)).map_err(io)?;
    file.read_exact(hdr.as_mut_slice()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            bad("shorter than a setup header".into())
        } else {
            io(e)
        }
    })?;
    check_setup_header(&hdr).map_err(bad)?;
    Ok(hdr)
}

/// The checks of [`read_setup_header`], on a header already in memory.
pub fn check_setup_header(hdr: &setup_header) -> Result<(), String> {
    if { hdr.header } != 0x5372_6448 {
        return Err("no HdrS magic at offset 0x202".into());
    }
    if { hdr.version } < MIN_BOOT_PROTOCOL {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.12",
            hdr.version >> 8,
            hdr.version & 0xff
        ));
    }
    if hdr.loadflags & layout::LOADED_HIGH == 0 {
        return Err("not a bzImage (protected-mode code not loaded high)".into());
    }
    if { hdr.xloadflags } & layout::XLF_KERNEL_64 == 0 {
        return Err("no 64-bit entry point (xloadflags.XLF_KERNEL_64 clear)".into());
    }
    Ok(())
}

/// Loads a Linux kernel, its command line and initramfs and writes the boot tables.
/// `elf` picks the ELF vmlinux loader instead of the bzImage one.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    vcpus: u8,
    kernel: &Path,
    elf: bool,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<Entry, KvmError> {
    let mut file = File::open(kernel).map_err(|source| KvmError::ReadKernel {
        path: kernel.to_owned(),
        source,
    })?;
    let low_end = layout::low_mem_end(mem_bytes);
    let (header, entry, kernel_end) = if elf {
        let loaded = Elf::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(|source| KvmError::LoadKernel {
            path: kernel.to_owned(),
            source,
        })?;
        (None, loaded.kernel_load.0, loaded.kernel_end)
    } else {
        let hdr = read_setup_header(kernel, &mut file)?;
        let load = layout::HIMEM_START;
        // The decompressor works in place and needs `init_size` bytes from the load
        // address; less memory than that fails late and obscurely inside the guest.
        let need = u64::from(hdr.init_size).max(file_len(kernel, &file)?);
        if load + need > low_end {
            return Err(KvmError::KernelTooBig {
                path: kernel.to_owned(),
                need,
                have: low_end,
            });
        }
        let loaded =
            BzImage::load(mem, Some(GuestAddress(load)), &mut file, None).map_err(|source| {
                KvmError::LoadKernel {
                    path: kernel.to_owned(),
                    source,
                }
            })?;
        let header = loaded.setup_header.unwrap_or(hdr);
        (Some(header), load + BZIMAGE_64BIT_ENTRY_OFFSET, load + need)
    };

    let max_cmdline = header
        .map(|h| (h.cmdline_size as usize).saturating_sub(1))
        .filter(|n| *n > 0)
        .unwrap_or(layout::CMDLINE_MAX - 1)
        .min(layout::CMDLINE_MAX - 1);
    write_cmdline(mem, cmdline, max_cmdline)?;

    let initramfs = match initramfs {
        Some(path) => {
            let mut f = File::open(path).map_err(|source| KvmError::ReadInitramfs {
                path: path.to_owned(),
                source,
            })?;
            let size = f
                .metadata()
                .map_err(|source| KvmError::ReadInitramfs {
                    path: path.to_owned(),
                    source,
                })?
                .len();
            let max = header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0);
            let addr =
                layout::initramfs_addr(mem_bytes, kernel_end, max.unwrap_or(0x7fff_ffff), size)
                    .ok_or_else(|| KvmError::InitramfsTooBig {
                        path: path.to_owned(),
                        size,
                    })?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
                .map_err(|e| KvmError::ReadInitramfs {
                    path: path.to_owned(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            Some((addr, size))
        }
        None => None,
    };

    let e820 = layout::e820_map(mem_bytes);
    let params = layout::boot_params(&BootParamsInput {
        header,
        cmdline_len: cmdline.len(),
        initramfs,
        e820: &e820,
    });
    write(mem, layout::ZERO_PAGE_ADDR, params.as_slice())?;
    for (addr, bytes) in layout::identity_page_tables() {
        write(mem, addr, &bytes)?;
    }
    let gdt: Vec<u8> = layout::boot_gdt()
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write(mem, layout::GDT_ADDR, &gdt)?;
    write(mem, layout::IDT_ADDR, &0u64.to_le_bytes())?;
    write(mem, layout::EBDA_START, &layout::mp_table(vcpus))?;
    Ok(Entry::Linux64(entry))
}

fn file_len(path: &Path, file: &File) -> Result<u64, KvmError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| KvmError::ReadKernel {
            path: path.to_owned(),
            source,
        })
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), KvmError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(KvmError::CmdlineNul);
    }
    if cmdline.len() > max {
        return Err(KvmError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write(mem, layout::CMDLINE_ADDR, &bytes)
}

/// Copies a real-mode program to its load address.
pub fn load_real_mode(mem: &GuestMemoryMmap, program: &[u8]) -> Result<Entry, KvmError> {
    if program.len() > layout::REALMODE_MAX_LEN {
        return Err(KvmError::RealModeTooBig {
            len: program.len(),
            max: layout::REALMODE_MAX_LEN,
        });
    }
    write(mem, layout::REALMODE_LOAD_ADDR, program)?;
    Ok(Entry::RealMode)
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), KvmError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| KvmError::WriteGuestMemory {
            addr,
            reason: e.to_string(),
        })
}

/// The CPUID a vCPU sees: what KVM supports on this host, with the topology made
/// consistent for vCPU `index` of `count` (APIC ids, logical processor count) and the
/// hypervisor bit set so the guest knows it is virtualised.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count above is meaningful
                }
            }
            // Extended topology: x2APIC id in edx.
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
}

/// `KVM_GET_SUPPORTED_CPUID`, asked once per process: it cannot change while the
/// module is loaded, and asking costs a third of a millisecond per vCPU.
fn supported_cpuid(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, KvmError> {
    static SUPPORTED: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();
    if let Some(entries) = SUPPORTED.get() {
        return Ok(entries.clone());
    }
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| KvmError::Kvm {
            op: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    Ok(SUPPORTED.get_or_init(|| cpuid.as_slice().to_vec()).clone())
}

/// Applies CPUID, MSRs, FPU and local-APIC state common to every vCPU.
pub fn setup_vcpu_common(kvm: &Kvm, vcpu: &VcpuFd, index: u8, count: u8) -> Result<(), KvmError> {
    let mut cpuid = CpuId::from_entries(&supported_cpuid(kvm)?)
        .map_err(|e| KvmError::InvalidConfig(format!("CPUID list: {e:?}")))?;
    patch_cpuid(cpuid.as_mut_slice(), index, count);
    vcpu.set_cpuid2(&cpuid).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_CPUID2",
        source,
    })?;

    let msr = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(0x174, 0),             // IA32_SYSENTER_CS
        msr(0x175, 0),             // IA32_SYSENTER_ESP
        msr(0x176, 0),             // IA32_SYSENTER_EIP
        msr(0xc000_0081, 0),       // STAR
        msr(0xc000_0082, 0),       // LSTAR
        msr(0xc000_0083, 0),       // CSTAR
        msr(0xc000_0084, 0),       // SYSCALL_MASK
        msr(0xc000_0102, 0),       // KERNEL_GS_BASE
        msr(0x10, 0),              // TSC
        msr(0x1a0, 1),             // IA32_MISC_ENABLE: fast strings, as firmware leaves it
        msr(0x2ff, (1 << 11) | 6), // MTRRdefType: MTRRs on, default write-back
    ];
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| KvmError::InvalidConfig(format!("MSR list: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_MSRS",
        source,
    })?;
    if set != entries.len() {
        return Err(KvmError::InvalidConfig(format!(
            "KVM accepted only {set} of {} boot MSRs (MSR {:#x} refused)",
            entries.len(),
            entries[set].index
        )));
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_FPU",
        source,
    })?;

    // LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs: what the MP table says
    // and what a real-mode guest without an IOAPIC relies on.
    let mut lapic = vcpu.get_lapic().map_err(|source| KvmError::Kvm {
        op: "KVM_GET_LAPIC",
        source,
    })?;
    set_lvt(&mut lapic.regs, 0x350, 0x700);
    set_lvt(&mut lapic.regs, 0x360, 0x400);
    vcpu.set_lapic(&lapic).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_LAPIC",
        source,
    })?;
    Ok(())
}

/// Sets an LVT register's delivery mode (unmasked) in a `kvm_lapic_state` register page.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !(0x700 | 0x1_0000)) | mode;
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let (base, limit, type_, present, dpl, db, s, l, g) = layout::decode_gdt_entry(entry);
    kvm_segment {
        base,
        limit,
        selector,
        type_,
        present,
        dpl,
        db,
        s,
        l,
        g,
        avl: 0,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Puts the boot vCPU in 64-bit long mode at `entry` as the boot protocol specifies:
/// paging on with the identity map, flat `__BOOT_CS`/`__BOOT_DS`, interrupts off,
/// `rsi` = zero page.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64) -> Result<(), KvmError> {
    let mut sregs = vcpu.get_sregs().map_err(|source| KvmError::Kvm {
        op: "KVM_GET_SREGS",
        source,
    })?;
    let gdt = layout::boot_gdt();
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(gdt[2], 0x10);
    let data = segment(gdt[3], 0x18);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[4], 0x20);
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 31); // PE, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_SREGS",
        source,
    })?;
    let regs = kvm_bindings::kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: layout::BOOT_STACK_ADDR,
        rbp: layout::BOOT_STACK_ADDR,
        rsi: layout::ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_REGS",
        source,
    })
}

/// Puts the boot vCPU in real mode at `0000:REALMODE_LOAD_ADDR` with all data segments
/// and the stack in segment 0.
pub fn setup_real_mode(vcpu: &VcpuFd) -> Result<(), KvmError> {
    let mut sregs = vcpu.get_sregs().map_err(|source| KvmError::Kvm {
        op: "KVM_GET_SREGS",
        source,
    })?;
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_SREGS",
        source,
    })?;
    let regs = kvm_bindings::kvm_regs {
        rflags: 2,
        rip: layout::REALMODE_LOAD_ADDR,
        rsp: layout::REALMODE_STACK,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|source| KvmError::Kvm {
        op: "KVM_SET_REGS",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file shaped like a bzImage: setup sectors with a 2.15 header, then a payload.
    pub(crate) fn fake_bzimage(init_size: u32, payload: usize) -> tempfile::NamedTempFile {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512 + payload];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = layout::LOADED_HIGH;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
        img[0x236..0x238].copy_from_slice(&layout::XLF_KERNEL_64.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        let n = img.len();
        img[n - 4..].copy_from_slice(b"TAIL");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&img).unwrap();
        f
    }

    fn mem(bytes: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = layout::memory_ranges(bytes)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn bzimage_boot_writes_every_table_the_kernel_reads() {
        let kernel = fake_bzimage(0x80_0000, 0x1000);
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[0x5a; 10_000]).unwrap();
        let mem_bytes = 64 << 20;
        let m = mem(mem_bytes);
        let cmdline = "console=ttyS0 reboot=k";
        let entry = load_linux(
            &m,
            mem_bytes,
            2,
            kernel.path(),
            false,
            Some(initrd.path()),
            cmdline,
        )
        .unwrap();
        assert_eq!(entry, Entry::Linux64(layout::HIMEM_START + 0x200));
        // Protected-mode code (everything after the setup sectors) is at 1 MiB.
        let tail: [u8; 4] = m
            .read_obj(GuestAddress(layout::HIMEM_START + 0x1000 - 4))
            .unwrap();
        assert_eq!(&tail, b"TAIL");
        let p: linux_loader::loader::bootparam::boot_params =
            m.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.version }, 0x020f, "the kernel's own header is kept");
        assert_eq!({ p.hdr.code32_start }, layout::HIMEM_START as u32);
        let mut got = vec![0u8; cmdline.len() + 1];
        m.read_slice(&mut got, GuestAddress({ p.hdr.cmd_line_ptr }.into()))
            .unwrap();
        assert_eq!(&got[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(got[cmdline.len()], 0);
        let (rd, rd_size) = ({ p.hdr.ramdisk_image } as u64, { p.hdr.ramdisk_size }
            as u64);
        assert_eq!(rd_size, 10_000);
        assert!(
            rd >= layout::HIMEM_START + 0x80_0000,
            "initramfs above the decompressor"
        );
        assert!(rd + rd_size <= mem_bytes);
        let mut rd_bytes = vec![0u8; 10_000];
        m.read_slice(&mut rd_bytes, GuestAddress(rd)).unwrap();
        assert!(rd_bytes.iter().all(|b| *b == 0x5a));
        assert_eq!(p.e820_entries, 2);
        let mp: [u8; 4] = m.read_obj(GuestAddress(layout::EBDA_START)).unwrap();
        assert_eq!(&mp, b"_MP_");
        let pml4: u64 = m.read_obj(GuestAddress(layout::PML4_ADDR)).unwrap();
        assert_eq!(pml4, layout::PDPT_ADDR | 3);
        let code: u64 = m.read_obj(GuestAddress(layout::GDT_ADDR + 0x10)).unwrap();
        assert_eq!(code, layout::boot_gdt()[2]);
    }

    #[test]
    fn bzimage_refusals_say_why() {
        let kernel = fake_bzimage(0x400_0000, 0x1000);
        let m = mem(32 << 20);
        let err = load_linux(&m, 32 << 20, 1, kernel.path(), false, None, "").unwrap_err();
        assert!(matches!(err, KvmError::KernelTooBig { .. }), "{err}");

        let kernel = fake_bzimage(0x10_0000, 0x1000);
        let m = mem(8 << 20);
        let long = "x".repeat(3000);
        let err = load_linux(&m, 8 << 20, 1, kernel.path(), false, None, &long).unwrap_err();
        assert!(
            matches!(
                err,
                KvmError::CmdlineTooLong {
                    len: 3000,
                    max: 2047
                }
            ),
            "{err}"
        );
        let err = load_linux(&m, 8 << 20, 1, kernel.path(), false, None, "a\0b").unwrap_err();
        assert!(matches!(err, KvmError::CmdlineNul), "{err}");

        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&vec![0u8; 7 << 20]).unwrap();
        let err = load_linux(
            &m,
            8 << 20,
            1,
            kernel.path(),
            false,
            Some(initrd.path()),
            "",
        )
        .unwrap_err();
        assert!(matches!(err, KvmError::InitramfsTooBig { .. }), "{err}");

        let mut not_linux = tempfile::NamedTempFile::new().unwrap();
        not_linux.write_all(&[0u8; 4096]).unwrap();
        let err = load_linux(&m, 8 << 20, 1, not_linux.path(), false, None, "").unwrap_err();
        assert!(err.to_string().contains("HdrS"), "{err}");
    }

    /// With `PROVIDER_TEST_KERNEL` naming a real bzImage (e.g. Debian's
    /// `vmlinuz-*-cloud-amd64`), load it as a VM start would and check what the kernel will
    /// find. Without it there is no real kernel on a CI machine, and the test says so.
    #[test]
    fn real_bzimage_loads_when_provided() {
        let Some(path) = std::env::var_os("PROVIDER_TEST_KERNEL") else {
            eprintln!("SKIP: set PROVIDER_TEST_KERNEL to a bzImage to load a real kernel");
            return;
        };
        let path = std::path::PathBuf::from(path);
        let mut f = File::open(&path).unwrap();
        let hdr = read_setup_header(&path, &mut f).unwrap();
        let mem_bytes = 256 << 20;
        let m = mem(mem_bytes);
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[0x07; 4096]).unwrap();
        let entry = load_linux(
            &m,
            mem_bytes,
            2,
            &path,
            false,
            Some(initrd.path()),
            crate::kvm::DEFAULT_CMDLINE,
        )
        .unwrap();
        assert_eq!(entry, Entry::Linux64(layout::HIMEM_START + 0x200));
        let p: linux_loader::loader::bootparam::boot_params =
            m.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.version }, { hdr.version });
        assert_eq!({ p.hdr.init_size }, { hdr.init_size });
        let rd = u64::from(p.hdr.ramdisk_image);
        assert!(rd >= layout::HIMEM_START + u64::from(hdr.init_size));
        assert!(rd + 4096 <= u64::from(hdr.initrd_addr_max) + 1);
        // The protected-mode code starts where the file's setup sectors end.
        let setup = (usize::from(hdr.setup_sects) + 1) * 512;
        let file = std::fs::read(&path).unwrap();
        let mut first = [0u8; 64];
        m.read_slice(&mut first, GuestAddress(layout::HIMEM_START))
            .unwrap();
        assert_eq!(&first[..], &file[setup..setup + 64]);
        eprintln!(
            "{}: boot protocol {}.{:02}, init_size {:#x}, setup {} sectors, initrd at {rd:#x}",
            path.display(),
            { hdr.version } >> 8,
            { hdr.version } & 0xff,
            { hdr.init_size },
            hdr.setup_sects
        );
    }

    #[test]
    fn old_or_32bit_only_headers_are_refused() {
        let ok = setup_header {
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: layout::LOADED_HIGH,
            xloadflags: layout::XLF_KERNEL_64,
            ..Default::default()
        };
        assert!(check_setup_header(&ok).is_ok());
        let old = setup_header {
            version: 0x020b,
            ..ok
        };
        assert!(check_setup_header(&old).unwrap_err().contains("2.11"));
        let no64 = setup_header {
            xloadflags: 0,
            ..ok
        };
        assert!(check_setup_header(&no64).unwrap_err().contains("64-bit"));
        let zimage = setup_header { loadflags: 0, ..ok };
        assert!(check_setup_header(&zimage).is_err());
    }

    #[test]
    fn cpuid_topology_names_each_vcpu() {
        let mut entries = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
        ];
        patch_cpuid(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(
            entries[0].ebx & 0xffff,
            0x0800,
            "CLFLUSH size and brand kept"
        );
        assert_ne!(entries[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(entries[0].edx & (1 << 28), 0);
        assert_eq!(entries[1].edx, 3);
    }

    #[test]
    fn lvt_mode_is_set_and_unmasked() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x352] = 0x01; // masked
        set_lvt(&mut regs, 0x350, 0x700);
        let v = u32::from_le_bytes([
            regs[0x350] as u8,
            regs[0x351] as u8,
            regs[0x352] as u8,
            regs[0x353] as u8,
        ]);
        assert_eq!(v, 0x700);
    }
}
