//! The legacy devices a microVM needs, on the port-I/O bus: two 16550 UARTs (COM1 is the
//! console, written to the job log; COM2 carries the host channel) with their interrupts
//! wired to KVM through irqfds, and the i8042 controller for its CPU-reset command.
//! Everything else on the port bus reads as an absent device (all ones) and ignores
//! writes, which is what Linux probes expect from empty ISA slots.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port (console, ttyS0).
pub const COM1_PORT: u16 = 0x3f8;
/// COM2 base port (host channel, ttyS1).
pub const COM2_PORT: u16 = 0x2f8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u32 = 4;
/// COM2's ISA interrupt.
pub const COM2_IRQ: u32 = 3;
/// The i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 command/status port; writing 0xfe there resets the CPU.
pub const I8042_CMD_PORT: u16 = 0x64;
/// Console bytes beyond this are dropped (and the log says so) so a chatty or hostile
/// guest cannot fill the provider's disk.
pub const CONSOLE_LOG_LIMIT: u64 = 16 << 20;

/// An eventfd that raises a guest interrupt (registered with KVM as an irqfd) or wakes
/// the VMM thread.
#[derive(Debug)]
pub struct EventTrigger(pub EventFd);

impl Trigger for EventTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Wakes the VMM thread when the guest has drained COM2's receive FIFO, so host bytes
/// waiting for room can be queued.
#[derive(Debug)]
pub struct DrainedEvent(pub Arc<EventFd>);

impl SerialEvents for DrainedEvent {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A lost wake-up would stall input; the eventfd counter cannot overflow in
        // practice (2^64 - 2 wake-ups), so an error here is not actionable.
        let _ = self.0.write(1);
    }
}

/// The console sink: buffers whole lines before writing them to the job log (the UART
/// model flushes after every byte, which would be one syscall per byte), and caps the
/// log's size.
#[derive(Debug)]
pub struct ConsoleLog {
    file: File,
    pending: Vec<u8>,
    written: u64,
    truncated: bool,
}

impl ConsoleLog {
    /// A console writing to `file`.
    pub fn new(file: File) -> Self {
        Self {
            file,
            pending: Vec::with_capacity(256),
            written: 0,
            truncated: false,
        }
    }

    /// Writes out whatever is buffered (called at teardown).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let room = CONSOLE_LOG_LIMIT.saturating_sub(self.written) as usize;
        let n = room.min(self.pending.len());
        self.file.write_all(&self.pending[..n])?;
        self.written += n as u64;
        if n < self.pending.len() && !self.truncated {
            self.truncated = true;
            self.file
                .write_all(b"\n[provider: console log limit reached, further output dropped]\n")?;
        }
        self.pending.clear();
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if self.pending.contains(&b'\n') || self.pending.len() >= 4096 {
            self.sync()?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        // Deliberately lazy: see the type's docs. `sync` does the real work.
        Ok(())
    }
}

/// COM2's transmit side: bytes go straight to the host channel socket. `send` with
/// `MSG_NOSIGNAL` so a peer that went away is an error here, not a SIGPIPE that kills
/// the provider.
#[derive(Debug)]
pub struct ChannelWriter {
    fd: Arc<OwnedFd>,
}

impl ChannelWriter {
    /// A writer on the channel socket.
    pub fn new(fd: Arc<OwnedFd>) -> Self {
        Self { fd }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `fd` is a valid open socket for the lifetime of `self` (we hold an Arc
        // of it) and `buf` is a valid readable slice of `buf.len()` bytes.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a port write asked of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    /// Nothing beyond the device's own state.
    None,
    /// The guest asked the i8042 to reset the CPU: treat as shutdown.
    Reset,
}

/// The port-I/O bus with its devices. One lock around all of them: port exits are short
/// and rare compared with the guest's own work, and a single lock keeps the ordering of
/// a UART's registers obvious.
pub struct PortBus {
    /// COM1, the console.
    pub com1: Serial<EventTrigger, vm_superio::serial::NoEvents, ConsoleLog>,
    /// COM2, the host channel.
    pub com2: Serial<EventTrigger, DrainedEvent, ChannelWriter>,
    i8042: I8042Device<ResetFlag>,
    reset: Arc<AtomicBool>,
}

/// Trigger for the i8042: records that the guest asked for a reset.
#[derive(Debug)]
struct ResetFlag(Arc<AtomicBool>);

impl Trigger for ResetFlag {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl PortBus {
    /// Builds the bus from the two UARTs' interrupt eventfds, the console log, the channel
    /// socket and the eventfd that reports COM2's receive FIFO drained.
    pub fn new(
        com1_irq: EventFd,
        com2_irq: EventFd,
        console: ConsoleLog,
        channel: ChannelWriter,
        com2_drained: Arc<EventFd>,
    ) -> Self {
        let reset = Arc::new(AtomicBool::new(false));
        Self {
            com1: Serial::new(EventTrigger(com1_irq), console),
            com2: Serial::with_events(EventTrigger(com2_irq), DrainedEvent(com2_drained), channel),
            i8042: I8042Device::new(ResetFlag(reset.clone())),
            reset,
        }
    }

    /// An `in` from `port`: fills `data`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port {
            COM1_PORT..=0x3ff => Some(self.com1.read((port - COM1_PORT) as u8)),
            COM2_PORT..=0x2ff => Some(self.com2.read((port - COM2_PORT) as u8)),
            I8042_DATA_PORT | I8042_CMD_PORT => {
                Some(self.i8042.read((port - I8042_DATA_PORT) as u8))
            }
            _ => None,
        };
        match value {
            Some(v) => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = v;
                }
            }
            // Absent device: all data lines float high.
            None => data.fill(0xff),
        }
    }

    /// An `out` to `port` with `data`.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PortAction {
        let Some(&value) = data.first() else {
            return PortAction::None;
        };
        match port {
            // A failed write to the console or channel loses that byte (the UART raises
            // its THR-empty interrupt anyway, as real hardware would); the VM goes on.
            COM1_PORT..=0x3ff => drop(self.com1.write((port - COM1_PORT) as u8, value)),
            COM2_PORT..=0x2ff => drop(self.com2.write((port - COM2_PORT) as u8, value)),
            I8042_DATA_PORT | I8042_CMD_PORT => {
                let _ = self.i8042.write((port - I8042_DATA_PORT) as u8, value);
                if self.reset.swap(false, Ordering::SeqCst) {
                    return PortAction::Reset;
                }
            }
            _ => {}
        }
        PortAction::None
    }

    /// Writes buffered console output to the log.
    pub fn sync_console(&mut self) -> io::Result<()> {
        self.com1.writer_mut().sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn bus() -> (PortBus, UnixStream, tempfile::NamedTempFile, Arc<EventFd>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let bus = PortBus::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleLog::new(log.reopen().unwrap()),
            ChannelWriter::new(Arc::new(OwnedFd::from(ours))),
            drained.clone(),
        );
        (bus, theirs, log, drained)
    }

    #[test]
    fn com2_bytes_reach_the_channel_and_com1_the_log() {
        let (mut bus, mut peer, log, _) = bus();
        for b in b"hi\n" {
            bus.write(COM2_PORT, &[*b]);
        }
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi\n");
        for b in b"boot\nno newline" {
            bus.write(COM1_PORT, &[*b]);
        }
        assert_eq!(
            std::fs::read(log.path()).unwrap(),
            b"boot\n",
            "only whole lines before sync"
        );
        bus.sync_console().unwrap();
        assert_eq!(std::fs::read(log.path()).unwrap(), b"boot\nno newline");
    }

    #[test]
    fn host_input_is_readable_and_draining_signals() {
        let (mut bus, _peer, _log, drained) = bus();
        bus.com2.enqueue_raw_bytes(b"ab").unwrap();
        let mut d = [0u8];
        bus.read(COM2_PORT + 5, &mut d);
        assert_eq!(d[0] & 1, 1, "LSR data ready");
        bus.read(COM2_PORT, &mut d);
        assert_eq!(d[0], b'a');
        assert!(drained.read().is_err(), "not drained yet");
        bus.read(COM2_PORT, &mut d);
        assert_eq!(d[0], b'b');
        assert_eq!(drained.read().unwrap(), 1);
        bus.read(COM2_PORT + 5, &mut d);
        assert_eq!(d[0] & 1, 0);
    }

    #[test]
    fn i8042_reset_command_is_reported_and_empty_ports_float() {
        let (mut bus, _peer, _log, _) = bus();
        assert_eq!(bus.write(I8042_CMD_PORT, &[0xd1]), PortAction::None);
        assert_eq!(bus.write(I8042_CMD_PORT, &[0xfe]), PortAction::Reset);
        let mut d = [0u8; 2];
        bus.read(0x3e8, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        bus.read(0x70, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn console_log_is_capped() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut c = ConsoleLog::new(log.reopen().unwrap());
        let line = vec![b'x'; 1 << 20];
        for _ in 0..(CONSOLE_LOG_LIMIT >> 20) + 2 {
            c.write_all(&line).unwrap();
        }
        c.sync().unwrap();
        let len = std::fs::metadata(log.path()).unwrap().len();
        assert!(
            len > CONSOLE_LOG_LIMIT && len < CONSOLE_LOG_LIMIT + 200,
            "{len}"
        );
    }
}
