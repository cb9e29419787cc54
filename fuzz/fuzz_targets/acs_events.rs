//! ACS callback bodies: `acs::events::decode` never panics, and every event it returns can be
//! turned into the event the store correlates.

#![no_main]

use callops::acs::events::{AcsEvent, decode};
use callops::operation::{CallRef, Transition};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let Ok(events) = decode(data) else {
        return;
    };
    for event in events {
        check(event);
    }
});

fn check(event: AcsEvent) {
    let received = OffsetDateTime::UNIX_EPOCH;
    assert!(event.event_type.ends_with(event.name()));
    // Empty ids and contexts are dropped while decoding.
    assert!(event.id.as_deref() != Some(""));
    assert!(event.operation_context.as_deref() != Some(""));
    assert!(event.call_connection_id.as_deref() != Some(""));
    let shown = format!("{event:?}");
    let copy = event.clone();
    let incoming = event.into_incoming(received);
    assert_eq!(incoming.id, copy.id);
    assert_eq!(incoming.event_type, copy.event_type);
    assert_eq!(incoming.context, copy.operation_context);
    assert_eq!(
        incoming.call.as_ref().map(CallRef::id),
        copy.call_connection_id.as_deref()
    );
    assert!(matches!(
        incoming.call,
        None | Some(CallRef::CallConnection(_))
    ));
    assert_eq!(incoming.received, received);
    // ACS callbacks report outcomes and progress, never an upstream's acceptance.
    assert!(!matches!(incoming.transition, Some(Transition::Accepted)));
    let _ = incoming.kind.as_str();
    let _ = incoming.key();
    std::hint::black_box((shown, format!("{incoming:?}")));
}
