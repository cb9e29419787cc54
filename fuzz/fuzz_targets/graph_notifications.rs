//! Graph `commsNotifications` bodies: `graph::notifications::decode` never panics, and every
//! field of every event it returns can be read.

#![no_main]

use callops::graph::notifications::{GraphEvent, decode};
use callops::operation::{CallRef, OperationError, ResultInfo, Transition};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let Ok(events) = decode(data, OffsetDateTime::UNIX_EPOCH) else {
        return;
    };
    for event in &events {
        check(event);
    }
});

fn check(event: &GraphEvent) {
    let incoming = &event.incoming;
    // Graph notifications carry no id: each gets the digest of its own JSON text.
    let id = incoming
        .id
        .as_deref()
        .expect("every notification gets an id");
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(incoming.event_type.contains('.'), "{}", incoming.event_type);
    assert_eq!(incoming.received, OffsetDateTime::UNIX_EPOCH);
    if let Some(call) = &incoming.call {
        assert!(matches!(call, CallRef::Call(_)));
        touch(call.id());
    }
    if let Some(context) = &incoming.context {
        touch(context);
    }
    touch(incoming.kind.as_str());
    if let Some(upstream) = &incoming.upstream_id {
        touch(upstream.shown());
        // The comparison key is the shown id, lower-case, without hyphens.
        assert!(!upstream.key().contains('-'));
        assert_eq!(
            upstream.key(),
            callops::correlation::upstream_key(upstream.shown()).as_ref()
        );
    }
    if let Some(status) = &incoming.upstream_status {
        touch(status);
    }
    std::hint::black_box(incoming.cancelled);
    match &incoming.transition {
        None | Some(Transition::Started) => {}
        Some(Transition::Accepted) => panic!("a notification never reports an acceptance"),
        Some(Transition::Succeeded { result } | Transition::Canceled { result }) => {
            result_info(result.as_ref());
        }
        Some(Transition::Failed {
            result,
            error: OperationError { code, message },
        }) => {
            result_info(result.as_ref());
            assert!(!code.is_empty());
            touch(message);
        }
    }
    if let Some(result) = &event.call_ended {
        result_info(result.as_ref());
    }
    let _ = incoming.key();
    std::hint::black_box(format!("{event:?}"));
}

fn result_info(result: Option<&ResultInfo>) {
    let Some(result) = result else {
        return;
    };
    // An empty result is reported as none.
    assert_ne!(result, &ResultInfo::default());
    std::hint::black_box((result.code, result.sub_code));
    result.message.as_deref().map(touch);
    result.completion_reason.as_deref().map(touch);
}

fn touch(text: &str) {
    std::hint::black_box(text.len());
}
