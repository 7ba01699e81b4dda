//! The mux over a real socket pair: handshake, control messages, streams, flow control,
//! resets and protocol violations.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use channel::frame::{read_frame, write_frame, Kind};
use channel::{ChannelError, GuestMsg, HostMsg, Mux, Side, INITIAL_WINDOW, MAGIC, VERSION};

fn pair() -> (Mux, Mux) {
    let (a, b) = UnixStream::pair().unwrap();
    let guest = thread::spawn(move || {
        Mux::handshake(Side::Guest, Box::new(b.try_clone().unwrap()), Box::new(b)).unwrap()
    });
    let host = Mux::handshake(Side::Host, Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
    (host, guest.join().unwrap())
}

fn hello(version: u16) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&version.to_le_bytes());
    p
}

#[test]
fn control_messages_round_trip_both_ways() {
    let (host, guest) = pair();
    host.send_msg(&HostMsg::Poweroff).unwrap();
    assert_eq!(
        guest
            .recv_msg::<HostMsg>(Some(Duration::from_secs(5)))
            .unwrap(),
        HostMsg::Poweroff
    );
    let ready = GuestMsg::Ready {
        agent: "x".into(),
        kernel: "y".into(),
    };
    guest.send_msg(&ready).unwrap();
    assert_eq!(
        host.recv_msg::<GuestMsg>(Some(Duration::from_secs(5)))
            .unwrap(),
        ready
    );
    assert!(matches!(
        host.recv_control(Some(Duration::from_millis(50))),
        Err(ChannelError::Timeout)
    ));
}

#[test]
fn version_mismatch_is_named() {
    let (a, mut b) = UnixStream::pair().unwrap();
    write_frame(&mut b, Kind::Hello, 0, &hello(VERSION + 1)).unwrap();
    let err = Mux::handshake(Side::Host, Box::new(a.try_clone().unwrap()), Box::new(a))
        .err()
        .unwrap();
    assert!(
        matches!(err, ChannelError::Version { theirs, .. } if theirs == VERSION + 1),
        "{err}"
    );

    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(b"login: \r\n garbage").unwrap();
    let err = Mux::handshake(Side::Host, Box::new(a.try_clone().unwrap()), Box::new(a))
        .err()
        .unwrap();
    assert!(err.to_string().contains("protocol"), "{err}");
}

/// A fast producer and a slow consumer: the consumer's buffer never exceeds one window and
/// every byte arrives in order.
#[test]
fn flow_control_bounds_the_receive_buffer() {
    let (host, guest) = pair();
    let mut rx = host.open_stream().unwrap();
    let id = rx.id();
    const TOTAL: usize = 8 * 1024 * 1024;
    let producer = thread::spawn(move || {
        let mut tx = guest.stream(id).unwrap();
        let mut sent = 0usize;
        let mut i = 0u8;
        while sent < TOTAL {
            let chunk: Vec<u8> = (0..100_000).map(|k| i.wrapping_add(k as u8)).collect();
            let n = chunk.len().min(TOTAL - sent);
            tx.write_all(&chunk[..n]).unwrap();
            sent += n;
            i = i.wrapping_add(1);
        }
        tx.shutdown_write().unwrap();
        guest
    });
    let mut got = Vec::with_capacity(TOTAL);
    let mut buf = [0u8; 4096];
    let mut max_buffered = 0;
    let mut reads = 0u32;
    loop {
        let n = rx.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        reads += 1;
        if reads % 64 == 0 {
            // Let the producer run ahead as far as it is allowed.
            thread::sleep(Duration::from_millis(1));
            max_buffered = max_buffered.max(host.buffered_bytes());
        }
    }
    let guest = producer.join().unwrap();
    assert_eq!(got.len(), TOTAL);
    let mut expected = Vec::with_capacity(TOTAL);
    let mut i = 0u8;
    while expected.len() < TOTAL {
        let n = 100_000.min(TOTAL - expected.len());
        expected.extend((0..n).map(|k| i.wrapping_add(k as u8)));
        i = i.wrapping_add(1);
    }
    assert!(got == expected, "stream bytes differ");
    assert!(
        max_buffered > 0,
        "the producer never got ahead: the test measured nothing"
    );
    assert!(
        max_buffered <= INITIAL_WINDOW as usize,
        "buffered {max_buffered} > window {INITIAL_WINDOW}"
    );
    drop(rx);
    // Both handles are gone: both sides forget the stream.
    for _ in 0..100 {
        if host.stream_count() == 0 && guest.stream_count() == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!((host.stream_count(), guest.stream_count()), (0, 0));
}

#[test]
fn peer_exceeding_its_window_is_a_protocol_error() {
    let (a, mut b) = UnixStream::pair().unwrap();
    write_frame(&mut b, Kind::Hello, 0, &hello(VERSION)).unwrap();
    let host = Mux::handshake(Side::Host, Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
    let f = read_frame(&mut b).unwrap().unwrap();
    assert_eq!(f.kind, Kind::Hello);
    let chunk = vec![0u8; 60_000];
    for _ in 0..5 {
        // 300 000 bytes on stream 2 without any credit beyond the initial window.
        write_frame(&mut b, Kind::Data, 2, &chunk).unwrap();
    }
    assert!(host.wait_closed(Duration::from_secs(5)));
    let why = host.closed().unwrap();
    assert!(why.contains("credited"), "{why}");
    assert!(host.buffered_bytes() <= INITIAL_WINDOW as usize);
}

#[test]
fn opened_streams_are_accepted_and_resets_carry_the_reason() {
    let (host, guest) = pair();
    let mut s = guest.open("proxy").unwrap();
    let (mut h, purpose) = host.accept(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(purpose, "proxy");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = h.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
    h.reset("no egress proxy for this job").unwrap();
    // Dropping the reset handle also sends `Eof`: the reader must still see the reset.
    drop(h);
    thread::sleep(Duration::from_millis(50));
    let err = s.read(&mut buf).unwrap_err();
    assert!(err.to_string().contains("no egress proxy"), "{err}");
    let err = loop {
        // The reset may still be in flight for the first writes.
        match s.write_all(b"more") {
            Ok(_) => thread::sleep(Duration::from_millis(5)),
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("no egress proxy"), "{err}");
}

#[test]
fn closing_the_transport_fails_pending_reads_with_the_reason() {
    let (a, mut b) = UnixStream::pair().unwrap();
    write_frame(&mut b, Kind::Hello, 0, &hello(VERSION)).unwrap();
    let host = Mux::handshake(Side::Host, Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
    let mut rx = host.open_stream().unwrap();
    let reader = thread::spawn(move || rx.read(&mut [0u8; 8]));
    thread::sleep(Duration::from_millis(50));
    drop(b);
    let err = reader.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("channel closed"), "{err}");
    assert!(matches!(
        host.recv_control(None),
        Err(ChannelError::Closed(_))
    ));
}
