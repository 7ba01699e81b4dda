//! Guest physical memory layout and the tables the Linux boot path writes into it: the
//! memory regions, the e820 map, the zero page (`boot_params`), identity page tables, the
//! boot GDT and the Intel MP table that tells Linux about the vCPUs and the IOAPIC.
//!
//! Everything here is pure (bytes and numbers in, bytes and numbers out) so the boot
//! path can be unit-tested on hosts where a Linux guest cannot run (PVM).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

/// Where the boot GDT lives (below the zero page, in memory no one else claims).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: Linux installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`); `rsi` points here at the 64-bit entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack for the 64-bit entry (grows down, below the page tables).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// PML4 of the identity map; PDPT and four page directories follow it.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages) covering 0..4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room reserved for the command line; Linux's own limit is `setup_header.cmdline_size`.
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the extended BIOS data area; the MP table goes here, outside e820 RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// Where high memory (and a bzImage's protected-mode code) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit hole for the IOAPIC, LAPIC and the KVM TSS; RAM beyond it moves
/// above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The KVM TSS (three pages) sits in the hole, below the IOAPIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// The IOAPIC's MMIO base, as the MP table announces it.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Where a real-mode program is loaded and started (`CS:IP = 0000:1000`); the IVT below
/// it and the stack above it stay free.
pub const REALMODE_LOAD_ADDR: u64 = 0x1000;
/// Real-mode stack top (`SS:SP = 0000:7000`).
pub const REALMODE_STACK: u64 = 0x7000;
/// Largest real-mode program: from the load address up to the stack.
pub const REALMODE_MAX_LEN: usize = (REALMODE_STACK - 0x100 - REALMODE_LOAD_ADDR) as usize;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: we are not one of the registered loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: the protected-mode code is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 0x01;
/// `loadflags` bit: `heap_end_ptr` is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// `xloadflags` bit: the kernel has the 64-bit entry point at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 0x01;
/// Default alignment for a kernel without a setup header (ELF vmlinux).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// The guest RAM ranges for `mem_bytes` of memory: one range below the 32-bit hole and,
/// for large guests, the rest above 4 GiB.
pub fn memory_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// The end (exclusive) of RAM below 4 GiB.
pub fn low_mem_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// The e820 map Linux sees: base memory up to the EBDA, then everything from 1 MiB up to
/// the hole, then RAM above 4 GiB. The legacy VGA/BIOS area and the EBDA (where the MP
/// table lives) are deliberately absent, so Linux treats them as reserved.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    let low_end = low_mem_end(mem_bytes);
    if low_end > HIMEM_START {
        map.push(boot_e820_entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            r#type: E820_RAM,
        });
    }
    if mem_bytes > MMIO_GAP_START {
        map.push(boot_e820_entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            r#type: E820_RAM,
        });
    }
    map
}

/// What the boot path decided, ready to be written into the zero page.
#[derive(Debug, Clone)]
pub struct BootParamsInput<'a> {
    /// The setup header read from a bzImage (None for an ELF vmlinux).
    pub header: Option<setup_header>,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Initramfs placement, if any: (guest address, size).
    pub initramfs: Option<(u64, u64)>,
    /// The e820 map.
    pub e820: &'a [boot_e820_entry],
}

/// Builds the zero page for the 64-bit boot protocol (Documentation/arch/x86/boot.rst):
/// the kernel's own setup header with the fields a boot loader must fill, the command line
/// pointer, the initramfs and the e820 map.
pub fn boot_params(input: &BootParamsInput<'_>) -> boot_params {
    let mut params = boot_params::default();
    let mut hdr = input.header.unwrap_or_else(|| setup_header {
        // An ELF vmlinux carries no header; give the kernel the fields it reads.
        kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
        ..Default::default()
    });
    hdr.boot_flag = BOOT_FLAG_MAGIC;
    hdr.header = HDRS_MAGIC;
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    // The heap end is relative to the real-mode code, which the 64-bit entry skips; the
    // conventional value keeps kernels that look at it happy.
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.ext_cmd_line_ptr = (CMDLINE_ADDR >> 32) as u32;
    hdr.cmdline_size = (input.cmdline_len + 1) as u32;
    if let Some((addr, size)) = input.initramfs {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.hdr = hdr;
    let n = input.e820.len().min(params.e820_table.len());
    params.e820_table[..n].copy_from_slice(&input.e820[..n]);
    params.e820_entries = n as u8;
    params
}

/// Where the initramfs goes: as high as possible in low memory (as boot loaders do), page
/// aligned, below the kernel's `initrd_addr_max` and above everything the kernel occupies
/// while it decompresses (`kernel_end`). None if it does not fit.
pub fn initramfs_addr(
    mem_bytes: u64,
    kernel_end: u64,
    initrd_addr_max: u64,
    size: u64,
) -> Option<u64> {
    let top = low_mem_end(mem_bytes).min(initrd_addr_max.saturating_add(1));
    let start = top.checked_sub(size)? & !0xfff;
    (start >= kernel_end).then_some(start)
}

/// Identity page tables for 0..4 GiB with 2 MiB pages, as (guest address, bytes) pairs:
/// the PML4, the PDPT and four page directories. The 64-bit boot protocol requires the
/// kernel, the zero page, the command line and the initramfs to be identity-mapped, and
/// the initramfs may sit anywhere below the hole.
pub fn identity_page_tables() -> Vec<(u64, Vec<u8>)> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_ADDR | PRESENT_RW).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    let mut tables = Vec::new();
    for gib in 0..4u64 {
        let pd_addr = PD_ADDR + gib * 0x1000;
        pdpt[(gib * 8) as usize..(gib * 8 + 8) as usize]
            .copy_from_slice(&(pd_addr | PRESENT_RW).to_le_bytes());
        let mut pd = vec![0u8; 4096];
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            pd[(i * 8) as usize..(i * 8 + 8) as usize]
                .copy_from_slice(&(phys | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
        }
        tables.push((pd_addr, pd));
    }
    let mut out = vec![(PML4_ADDR, pml4), (PDPT_ADDR, pdpt)];
    out.extend(tables);
    out
}

/// A flat segment descriptor for the boot GDT.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, null, 64-bit code at selector 0x10, data at 0x18, a TSS at 0x20
/// (the selectors the boot protocol documents: `__BOOT_CS`/`__BOOT_DS`).
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, accessed, L=1, G=1
        gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, accessed, D/B, G=1
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
    ]
}

/// Decodes a GDT entry into the fields KVM's `kvm_segment` wants:
/// (base, limit, type, present, dpl, db, s, l, g).
pub fn decode_gdt_entry(entry: u64) -> (u64, u32, u8, u8, u8, u8, u8, u8, u8) {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // KVM expects the limit in bytes: scale by the granularity.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    (
        base,
        limit,
        ((entry >> 40) & 0xf) as u8,
        ((entry >> 47) & 1) as u8,
        ((entry >> 45) & 3) as u8,
        ((entry >> 54) & 1) as u8,
        ((entry >> 44) & 1) as u8,
        ((entry >> 53) & 1) as u8,
        g,
    )
}

/// Sum of bytes modulo 256, for the MP table checksums.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// The Intel MultiProcessor table (spec 1.4) for `vcpus` CPUs: a floating pointer at
/// `EBDA_START` followed by the configuration table with one processor entry per vCPU
/// (APIC id = index), the ISA bus, the IOAPIC (id = `vcpus`) with ISA IRQs 0–15 wired to
/// the same pins (as KVM's default GSI routing does), and LINT0/LINT1 as ExtINT/NMI.
/// Without it (and without ACPI) Linux would only bring up the boot CPU.
pub fn mp_table(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = cpu;
        e[2] = 0x14; // local APIC version
        e[3] = 0x01 | if cpu == 0 { 0x02 } else { 0 }; // enabled, boot processor
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC feature flags
        entries.extend(e);
        count += 1;
    }
    entries.extend([1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    let mut ioapic = vec![2, ioapic_id, 0x11, 0x01];
    ioapic.extend(IOAPIC_ADDR.to_le_bytes());
    entries.extend(ioapic);
    count += 1;
    for irq in 0..16u8 {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0 IRQ n → IOAPIC pin n.
        entries.extend([3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 and NMI on LINT1 of every local APIC.
    entries.extend([4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = EBDA_START + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend(b"PCMP");
    table.extend(((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend(b"PROVIDER");
    table.extend(b"MICROVM     ");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend(APIC_ADDR.to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend(entries);
    table[7] = checksum(&table).wrapping_neg();

    let mut fp = Vec::with_capacity(16);
    fp.extend(b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision 1.4
    fp.push(0); // checksum, below
    fp.extend([0u8; 5]); // feature bytes: 0 = a configuration table is present
    fp[10] = checksum(&fp).wrapping_neg();

    fp.extend(table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range_and_two_e820_entries() {
        let mem = 256 << 20;
        assert_eq!(memory_ranges(mem), vec![(0, mem)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 2);
        assert_eq!({ map[0].addr }, 0);
        assert_eq!({ map[0].size }, EBDA_START);
        assert_eq!({ map[1].addr }, HIMEM_START);
        assert_eq!({ map[1].size }, mem - HIMEM_START);
        assert!(map.iter().all(|e| e.r#type == E820_RAM));
    }

    #[test]
    fn large_guest_skips_the_32bit_hole() {
        let mem = 5u64 << 30;
        assert_eq!(
            memory_ranges(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
        );
        let map = e820_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!({ map[1].addr } + { map[1].size }, MMIO_GAP_START);
        assert_eq!({ map[2].addr }, MMIO_GAP_END);
        let total: u64 = map.iter().map(|e| e.size).sum();
        // Everything except the legacy hole between the EBDA and 1 MiB is RAM.
        assert_eq!(total, mem - (HIMEM_START - EBDA_START));
        // No e820 RAM overlaps the KVM TSS, the IOAPIC or the LAPIC.
        for e in &map {
            let (a, s) = (e.addr, e.size);
            for fixed in [KVM_TSS_ADDR, u64::from(IOAPIC_ADDR), u64::from(APIC_ADDR)] {
                assert!(!(a..a + s).contains(&fixed));
            }
        }
    }

    #[test]
    fn boot_params_carry_header_cmdline_initramfs_and_e820() {
        let hdr = setup_header {
            version: 0x020f,
            loadflags: LOADED_HIGH,
            kernel_alignment: 0x20_0000,
            xloadflags: XLF_KERNEL_64,
            ..Default::default()
        };
        let e820 = e820_map(512 << 20);
        let p = boot_params(&BootParamsInput {
            header: Some(hdr),
            cmdline_len: 20,
            initramfs: Some((0x1f00_0000, 0x12345)),
            e820: &e820,
        });
        let h = p.hdr;
        assert_eq!({ h.boot_flag }, 0xaa55);
        assert_eq!({ h.header }, 0x5372_6448);
        assert_eq!({ h.type_of_loader }, 0xff);
        assert_eq!(
            { h.loadflags } & (LOADED_HIGH | CAN_USE_HEAP),
            LOADED_HIGH | CAN_USE_HEAP
        );
        assert_eq!({ h.cmd_line_ptr } as u64, CMDLINE_ADDR);
        assert_eq!({ h.cmdline_size }, 21);
        assert_eq!({ h.ramdisk_image }, 0x1f00_0000);
        assert_eq!({ h.ramdisk_size }, 0x12345);
        assert_eq!({ h.kernel_alignment }, 0x20_0000);
        assert_eq!({ h.version }, 0x020f);
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].addr }, HIMEM_START);
        assert_eq!({ p.e820_table[2].size }, 0);
        // Byte offsets the kernel reads, checked against boot.rst rather than our struct.
        let bytes: &[u8] = vm_memory::ByteValued::as_slice(&p);
        assert_eq!(bytes[0x1e8], 2, "e820_entries at 0x1e8");
        assert_eq!(&bytes[0x1fe..0x200], &[0x55, 0xaa], "boot_flag at 0x1fe");
        assert_eq!(&bytes[0x202..0x206], b"HdrS", "header magic at 0x202");
        assert_eq!(bytes[0x210], 0xff, "type_of_loader at 0x210");
        assert_eq!(
            u32::from_le_bytes(bytes[0x228..0x22c].try_into().unwrap()) as u64,
            CMDLINE_ADDR,
            "cmd_line_ptr at 0x228"
        );
        assert_eq!(
            u32::from_le_bytes(bytes[0x218..0x21c].try_into().unwrap()),
            0x1f00_0000,
            "ramdisk_image at 0x218"
        );
        // e820 table at 0x2d0, 20 bytes per entry: second entry's address.
        assert_eq!(
            u64::from_le_bytes(bytes[0x2d0 + 20..0x2d0 + 28].try_into().unwrap()),
            HIMEM_START
        );
    }

    #[test]
    fn elf_kernels_get_a_synthesised_header() {
        let e820 = e820_map(64 << 20);
        let p = boot_params(&BootParamsInput {
            header: None,
            cmdline_len: 0,
            initramfs: None,
            e820: &e820,
        });
        assert_eq!({ p.hdr.kernel_alignment }, DEFAULT_KERNEL_ALIGNMENT);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn initramfs_goes_high_and_never_below_the_kernel() {
        let mem = 256u64 << 20;
        let addr = initramfs_addr(mem, 0x200_0000, 0x7fff_ffff, 0x10_0001).unwrap();
        assert_eq!(addr & 0xfff, 0);
        assert!(addr + 0x10_0001 <= mem);
        assert!(mem - addr < 0x10_0001 + 0x1000);
        // Respect initrd_addr_max.
        let capped = initramfs_addr(mem, 0x200_0000, 0x0fff_ffff, 0x1000).unwrap();
        assert!(capped + 0x1000 <= 0x1000_0000);
        // Too big to fit above the kernel: refused, not overlapped.
        assert_eq!(
            initramfs_addr(mem, 0x200_0000, 0x7fff_ffff, mem - 0x100_0000),
            None
        );
        assert_eq!(initramfs_addr(mem, 0, 0x7fff_ffff, mem + 1), None);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let tables = identity_page_tables();
        assert_eq!(tables.len(), 6);
        let find = |addr: u64| &tables.iter().find(|(a, _)| *a == addr).unwrap().1;
        let entry =
            |t: &Vec<u8>, i: usize| u64::from_le_bytes(t[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(entry(find(PML4_ADDR), 0), PDPT_ADDR | 3);
        // Walk a few addresses: PML4[0] → PDPT[gib] → PD[2 MiB index] must give the same
        // physical address back.
        for addr in [
            0u64,
            0x7000,
            0x100_0000,
            0x3fff_ffff,
            0x8000_0000,
            0xbfe0_0000,
            0xffff_ffff,
        ] {
            let pdpte = entry(find(PDPT_ADDR), (addr >> 30) as usize);
            assert_eq!(pdpte & 3, 3);
            let pd = find(pdpte & !0xfff);
            let pde = entry(pd, ((addr >> 21) & 0x1ff) as usize);
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB page");
            assert_eq!((pde & !0x1f_ffff) | (addr & 0x1f_ffff), addr);
        }
    }

    #[test]
    fn gdt_code_segment_is_64bit_and_data_is_flat() {
        let gdt = boot_gdt();
        let (base, limit, ty, p, dpl, db, s, l, g) = decode_gdt_entry(gdt[2]);
        assert_eq!(
            (base, limit, ty, p, dpl, db, s, l, g),
            (0, 0xffff_ffff, 0xb, 1, 0, 0, 1, 1, 1)
        );
        let (base, limit, ty, p, _, db, s, l, _) = decode_gdt_entry(gdt[3]);
        assert_eq!(
            (base, limit, ty, p, db, s, l),
            (0, 0xffff_ffff, 3, 1, 1, 1, 0)
        );
        let (_, _, ty, p, _, _, s, _, _) = decode_gdt_entry(gdt[4]);
        assert_eq!((ty, p, s), (0xb, 1, 0));
    }

    #[test]
    fn mp_table_checksums_and_counts() {
        let t = mp_table(4);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(checksum(&t[..16]), 0, "floating pointer checksum");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64,
            EBDA_START + 16
        );
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert_eq!(checksum(table), 0, "configuration table checksum");
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // Processor entries: APIC ids 0..4, only the first is the boot processor.
        for cpu in 0..4usize {
            let e = &table[44 + cpu * 20..44 + cpu * 20 + 20];
            assert_eq!((e[0], e[1]), (0, cpu as u8));
            assert_eq!(e[3] & 2 != 0, cpu == 0);
        }
        // It must fit between the EBDA and the VGA hole.
        assert!(EBDA_START + t.len() as u64 <= 0xa0000);
        // And stay below that limit for the largest vCPU count we accept.
        assert!(EBDA_START + mp_table(super::super::MAX_VCPUS).len() as u64 <= 0xa0000);
    }
}
