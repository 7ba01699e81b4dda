//! The host↔guest frame layer (`channel::frame`) on raw bytes, and the JSON control
//! messages each side parses from the other: the guest agent reads `HostMsg`, the host
//! reads `GuestMsg` (which a hostile payload with root in the guest can forge).
//!
//! A frame that was read encodes back to the very bytes it was read from.
#![no_main]

use channel::frame::{encode, read_frame, Kind};
use channel::{GuestMsg, HostMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        let before = rest;
        match read_frame(&mut rest) {
            Ok(Some(frame)) => {
                let used = before.len() - rest.len();
                let mut out = Vec::new();
                encode(frame.kind, frame.stream, &frame.payload, &mut out);
                assert_eq!(out, before[..used]);
                if frame.kind == Kind::Control {
                    if let Ok(m) = serde_json::from_slice::<HostMsg>(&frame.payload) {
                        let again = serde_json::to_vec(&m).expect("encodes");
                        assert_eq!(serde_json::from_slice::<HostMsg>(&again).ok(), Some(m));
                    }
                    if let Ok(m) = serde_json::from_slice::<GuestMsg>(&frame.payload) {
                        let again = serde_json::to_vec(&m).expect("encodes");
                        assert_eq!(serde_json::from_slice::<GuestMsg>(&again).ok(), Some(m));
                    }
                }
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    // The control messages on their own, without the frame around them.
    let _ = serde_json::from_slice::<HostMsg>(data);
    let _ = serde_json::from_slice::<GuestMsg>(data);
});
