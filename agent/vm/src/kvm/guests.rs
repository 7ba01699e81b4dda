//! Small real-mode guests of our own, assembled here byte by byte, so the VMM's device
//! model and vCPU loop can be exercised on hosts where Linux cannot run under KVM (PVM)
//! and without a toolchain for guest code. They are loaded at `0000:1000` with all
//! segments zero and the stack at `0000:7000` (see [`super::layout`]).
//!
//! Each program talks to the 16550s the way a driver would: data port at the base, line
//! status at base + 5 (bit 0: data ready).

use std::collections::HashMap;

use super::layout::REALMODE_LOAD_ADDR;

const COM1: u16 = 0x3f8;
const COM2: u16 = 0x2f8;

/// A minimal 16-bit assembler: the handful of instructions these guests use, with labels
/// for short jumps and absolute addresses.
#[derive(Debug, Default)]
struct Asm {
    code: Vec<u8>,
    labels: HashMap<String, usize>,
    rel8: Vec<(usize, String)>,
    abs16: Vec<(usize, String)>,
    fresh: usize,
}

impl Asm {
    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    fn label(&mut self, name: &str) -> &mut Self {
        let previous = self.labels.insert(name.to_owned(), self.code.len());
        assert!(previous.is_none(), "label {name} defined twice");
        self
    }
    fn fresh(&mut self, prefix: &str) -> String {
        self.fresh += 1;
        format!("{prefix}.{}", self.fresh)
    }
    /// A short jump (`opcode rel8`) to `label`.
    fn jump(&mut self, opcode: u8, label: &str) -> &mut Self {
        self.code.push(opcode);
        self.rel8.push((self.code.len(), label.to_owned()));
        self.code.push(0);
        self
    }
    /// `opcode` followed by the 16-bit absolute address of `label`.
    fn with_addr(&mut self, opcode: &[u8], label: &str) -> &mut Self {
        self.code.extend_from_slice(opcode);
        self.abs16.push((self.code.len(), label.to_owned()));
        self.code.extend_from_slice(&[0, 0]);
        self
    }
    fn mov_dx(&mut self, v: u16) -> &mut Self {
        self.emit(&[0xba]).emit(&v.to_le_bytes())
    }
    fn mov_al(&mut self, v: u8) -> &mut Self {
        self.emit(&[0xb0, v])
    }
    fn out_dx_al(&mut self) -> &mut Self {
        self.emit(&[0xee])
    }
    fn in_al_dx(&mut self) -> &mut Self {
        self.emit(&[0xec])
    }
    fn out_imm_al(&mut self, port: u8) -> &mut Self {
        self.emit(&[0xe6, port])
    }
    fn cli(&mut self) -> &mut Self {
        self.emit(&[0xfa])
    }
    fn sti(&mut self) -> &mut Self {
        self.emit(&[0xfb])
    }
    fn hlt(&mut self) -> &mut Self {
        self.emit(&[0xf4])
    }
    fn jz(&mut self, l: &str) -> &mut Self {
        self.jump(0x74, l)
    }
    fn jnz(&mut self, l: &str) -> &mut Self {
        self.jump(0x75, l)
    }
    fn jb(&mut self, l: &str) -> &mut Self {
        self.jump(0x72, l)
    }
    fn ja(&mut self, l: &str) -> &mut Self {
        self.jump(0x77, l)
    }
    fn jmp(&mut self, l: &str) -> &mut Self {
        self.jump(0xeb, l)
    }
    /// Writes the NUL-terminated string at `label` to the UART at `port`.
    fn print(&mut self, port: u16, label: &str) -> &mut Self {
        let (top, done) = (self.fresh("print"), self.fresh("printed"));
        self.with_addr(&[0xbe], label) // mov si, label
            .mov_dx(port)
            .label(&top)
            .emit(&[0xac]) // lodsb
            .emit(&[0xa8, 0xff]) // test al, 0xff
            .jz(&done)
            .out_dx_al()
            .jmp(&top)
            .label(&done)
    }
    fn string(&mut self, label: &str, s: &str) -> &mut Self {
        self.label(label).emit(s.as_bytes()).emit(&[0])
    }
    fn finish(self) -> Vec<u8> {
        let mut code = self.code;
        for (at, label) in &self.rel8 {
            let target = self.labels[label] as isize;
            let disp = target - (*at as isize + 1);
            code[*at] =
                i8::try_from(disp).unwrap_or_else(|_| panic!("jump to {label} too far")) as u8;
        }
        for (at, label) in &self.abs16 {
            let addr = u16::try_from(REALMODE_LOAD_ADDR as usize + self.labels[label])
                .expect("real-mode programs live below 64 KiB");
            code[*at..*at + 2].copy_from_slice(&addr.to_le_bytes());
        }
        code
    }
}

/// Writes `console` to COM1 and `line` to COM2, then halts with interrupts off
/// (a guest shutdown).
pub fn hello(line: &str, console: &str) -> Vec<u8> {
    let mut a = Asm::default();
    a.print(COM1, "console").print(COM2, "line").cli().hlt();
    a.string("console", console).string("line", line);
    a.finish()
}

/// Writes one byte (`!`) to COM2 and halts with interrupts off: the benchmark guest.
pub fn first_byte() -> Vec<u8> {
    let mut a = Asm::default();
    a.mov_dx(COM2).mov_al(b'!').out_dx_al().cli().hlt();
    a.finish()
}

/// Writes `ready\n` to COM2, then reads a line from COM2 and echoes each byte back
/// upper-cased; after the newline it halts with interrupts off. It waits for input with
/// `sti; hlt` and COM2's receive interrupt (IRQ 3 through the PIC, vector 0x23), so it
/// also proves the UART's interrupt reaches the vCPU.
pub fn echo_upper() -> Vec<u8> {
    let mut a = Asm::default();
    // IVT entry 0x23 (PIC base 0x20 + IRQ 3) → handler, segment 0.
    a.with_addr(&[0xc7, 0x06, 0x8c, 0x00], "irq")
        .emit(&[0xc7, 0x06, 0x8e, 0x00, 0x00, 0x00]);
    // Master PIC: ICW1 edge + ICW4, vector base 0x20, slave on IRQ 2, 8086 mode;
    // then mask everything but IRQ 3.
    for (port, value) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xf7),
    ] {
        a.mov_al(value).out_imm_al(port);
    }
    // COM2: receive-data interrupt on, OUT2 (the IRQ gate on PC UARTs) on.
    a.mov_dx(COM2 + 1).mov_al(0x01).out_dx_al();
    a.mov_dx(COM2 + 4).mov_al(0x08).out_dx_al();
    a.print(COM2, "ready");
    a.label("wait")
        .cli()
        .mov_dx(COM2 + 5)
        .in_al_dx()
        .emit(&[0xa8, 0x01]) // test al, 1 (data ready)
        .jnz("have")
        .sti()
        .hlt() // `sti` delays interrupts by one instruction: no wake-up is lost here
        .jmp("wait");
    a.label("have")
        .mov_dx(COM2)
        .in_al_dx()
        .emit(&[0x3c, b'a']) // cmp al, 'a'
        .jb("send")
        .emit(&[0x3c, b'z']) // cmp al, 'z'
        .ja("send")
        .emit(&[0x2c, 0x20]); // sub al, 0x20
    a.label("send")
        .out_dx_al()
        .emit(&[0x3c, b'\n']) // cmp al, '\n'
        .jnz("wait")
        .cli()
        .hlt();
    // Interrupt handler: acknowledge at the PIC; the main loop reads the data.
    a.label("irq")
        .emit(&[0x50]) // push ax
        .mov_al(0x20)
        .out_imm_al(0x20) // EOI
        .emit(&[0x58, 0xcf]); // pop ax; iret
    a.string("ready", "ready\n");
    a.finish()
}

/// Spins forever (`jmp $`): only the time limit stops it.
pub fn spin() -> Vec<u8> {
    let mut a = Asm::default();
    a.label("top").jmp("top");
    a.finish()
}

/// Writes `x` to COM2 without end: a guest that outruns a host that does not read.
pub fn flood() -> Vec<u8> {
    let mut a = Asm::default();
    a.mov_dx(COM2)
        .mov_al(b'x')
        .label("top")
        .out_dx_al()
        .jmp("top");
    a.finish()
}

/// Enters protected mode with an empty IDT and executes `ud2`: there is no handler
/// for it, nor for the double fault that follows, so the CPU triple-faults (a shutdown).
/// (Real mode would not do: KVM's real-mode interrupt delivery ignores the IDT limit.)
pub fn triple_fault() -> Vec<u8> {
    let mut a = Asm::default();
    a.cli()
        .with_addr(&[0x0f, 0x01, 0x16], "gdtr") // lgdt [gdtr]
        .with_addr(&[0x0f, 0x01, 0x1e], "idtr") // lidt [idtr]
        .emit(&[0x0f, 0x20, 0xc0]) // mov eax, cr0
        .emit(&[0x0c, 0x01]) // or al, 1 (PE)
        .emit(&[0x0f, 0x22, 0xc0]) // mov cr0, eax
        .with_addr(&[0xea], "pm") // jmp far 0x08:pm
        .emit(&[0x08, 0x00]);
    a.label("pm").emit(&[0x0f, 0x0b]).label("hang").jmp("hang"); // ud2
                                                                 // GDT: null, then a 16-bit code segment (base 0, limit 64 KiB, present, exec/read).
    a.label("gdtr")
        .emit(&[15, 0])
        .with_addr(&[], "gdt")
        .emit(&[0, 0]);
    a.label("gdt")
        .emit(&[0; 8])
        .emit(&[0xff, 0xff, 0, 0, 0, 0x9a, 0, 0]);
    a.label("idtr").emit(&[0; 6]);
    a.finish()
}

/// Asks the i8042 to reset the CPU (what Linux does with `reboot=k`), then spins.
pub fn i8042_reset() -> Vec<u8> {
    let mut a = Asm::default();
    a.mov_al(0xfe).out_imm_al(0x64).label("hang").jmp("hang");
    a.finish()
}

/// Writes to every byte of `segments` 64 KiB segments from 64 KiB up (so that memory is
/// really allocated on the host; at most 9, up to 640 KiB), then says `done\n` on COM2 and resets through the i8042 (the quickest
/// shutdown). Used to show that teardown gives guest memory back.
pub fn touch_memory(segments: u8) -> Vec<u8> {
    let end = 0x1000 * (1 + u16::from(segments.clamp(1, 9)));
    let mut a = Asm::default();
    a.emit(&[0xb8, 0x00, 0x10]) // mov ax, 0x1000
        .label("seg")
        .emit(&[0x8e, 0xc0]) // mov es, ax
        .emit(&[0x31, 0xff]) // xor di, di
        .emit(&[0xb9, 0x00, 0x80]) // mov cx, 0x8000 (words)
        .emit(&[0xf3, 0xab]) // rep stosw
        .emit(&[0x05, 0x00, 0x10]) // add ax, 0x1000
        .emit(&[0x3d])
        .emit(&end.to_le_bytes()) // cmp ax, end
        .jb("seg");
    a.print(COM2, "done")
        .mov_al(0xfe)
        .out_imm_al(0x64)
        .label("hang")
        .jmp("hang");
    a.string("done", "done\n");
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_and_addresses_resolve() {
        // `jmp $` is EB FE.
        assert_eq!(spin(), vec![0xeb, 0xfe]);
        let p = hello("x\n", "c\n");
        // mov si, <address of "c\n">: the string follows the code.
        assert_eq!(p[0], 0xbe);
        let addr = u16::from_le_bytes([p[1], p[2]]) as usize - REALMODE_LOAD_ADDR as usize;
        assert_eq!(&p[addr..addr + 3], b"c\n\0");
        assert!(p.ends_with(b"x\n\0"));
        assert_eq!(
            first_byte(),
            vec![0xba, 0xf8, 0x02, 0xb0, b'!', 0xee, 0xfa, 0xf4]
        );
    }

    #[test]
    fn echo_handler_is_installed_at_vector_0x23() {
        let p = echo_upper();
        assert_eq!(&p[..4], &[0xc7, 0x06, 0x8c, 0x00]);
        let handler = u16::from_le_bytes([p[4], p[5]]) as usize - REALMODE_LOAD_ADDR as usize;
        assert_eq!(
            &p[handler..handler + 6],
            &[0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58]
        );
    }
}
