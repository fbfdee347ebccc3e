//! Requests as a guest sends them: protobuf bytes, decoded as ttrpc decodes
//! them, parsed by `server::convert` into checked requests, then served by
//! a fresh agent over fakes, in order.
//!
//! The first byte picks how the rest is read:
//! * even: raw calls `[vm][kind][len][len bytes]`, the bytes decoded as the
//!   message of `kind` (any bytes: the decoders' robustness);
//! * odd: calls built field by field from the input (names from a small
//!   vocabulary or any text, numbers as they come), encoded, then decoded
//!   as above, so that the fuzzer's comparisons reach the values the agent
//!   checks (a part number, a port) instead of stopping at varint encoding.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::{
    arbitrary::{self, Arbitrary, Unstructured},
    fuzz_target,
};
use nestless_fuzz::{agent, clear_state, config, exercise, replies, runtime, VMS};
use nestless_netagent::{
    agent::{AttachRequest, HostloJoin, HostloPart, HostloPublish, HostloWatch, NicSelector},
    names::Invalid,
    server::convert,
    stale::StalePolicy,
};
use nestless_protos::{agent as pb, protobuf::Message};

enum Call {
    Attach(AttachRequest),
    Detach(NicSelector),
    Join(HostloJoin),
    Leave(HostloPart),
    Publish(HostloPublish),
    Watch(HostloWatch),
}

/// Decodes `bytes` as `M` and parses it into `T`; `None` for either refusal.
fn parse<M, T>(bytes: &[u8]) -> Option<T>
where
    M: Message,
    T: for<'a> TryFrom<&'a M, Error = Invalid>,
{
    let msg = M::parse_from_bytes(bytes).ok()?;
    // A refusal's text is what the caller gets: build it too.
    T::try_from(&msg).map_err(|e| e.to_string()).ok()
}

fn decode(kind: u8, bytes: &[u8]) -> Option<Call> {
    Some(match kind % 6 {
        0 => Call::Attach(parse::<pb::AttachNicRequest, _>(bytes)?),
        1 => Call::Detach(parse::<pb::DetachNicRequest, _>(bytes)?),
        2 => Call::Join(parse::<pb::HostloJoinRequest, _>(bytes)?),
        3 => Call::Leave(parse::<pb::HostloLeaveRequest, _>(bytes)?),
        4 => Call::Publish(parse::<pb::HostloPublishRequest, _>(bytes)?),
        _ => Call::Watch(parse::<pb::HostloWatchRequest, _>(bytes)?),
    })
}

/// Raw calls: `[vm][kind][len][len bytes]`.
fn raw_calls(mut rest: &[u8]) -> Vec<(&'static str, Call)> {
    let mut calls = Vec::new();
    while let [vm, kind, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        if let Some(call) = decode(*kind, &tail[..n]) {
            calls.push((VMS[usize::from(*vm) % VMS.len()], call));
        }
        rest = &tail[n..];
    }
    calls
}

/// Text for a name field: mostly names the agent would take, sometimes any.
fn text(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    const WORDS: [&str; 10] = [
        "sb-1", "sb-2", "web", "db", "a", "b", "", "x.y-z_0", "eth0", "net1",
    ];
    if u.ratio(1, 4)? {
        String::arbitrary(u)
    } else {
        u.choose(&WORDS).map(|w| w.to_string())
    }
}

/// One message of `kind`, built from `u`, in its protobuf encoding.
fn built(kind: u8, u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let part = |u: &mut Unstructured<'_>| -> arbitrary::Result<u32> {
        if u.ratio(3, 4)? {
            u.int_in_range(0..=5)
        } else {
            u32::arbitrary(u)
        }
    };
    let bytes = match kind % 6 {
        0 => {
            let mut m = pb::AttachNicRequest {
                sandbox_id: text(u)?,
                network: text(u)?,
                scope: text(u)?,
                interface: text(u)?,
                ..Default::default()
            };
            for _ in 0..u.int_in_range(0..=3)? {
                m.labels.insert(text(u)?, text(u)?);
            }
            m.write_to_bytes()
        }
        1 => pb::DetachNicRequest {
            nic_id: text(u)?,
            sandbox_id: text(u)?,
            scope: text(u)?,
            interface: text(u)?,
            ..Default::default()
        }
        .write_to_bytes(),
        2 => pb::HostloJoinRequest {
            pod: text(u)?,
            part: part(u)?,
            sandbox_id: text(u)?,
            ..Default::default()
        }
        .write_to_bytes(),
        3 => pb::HostloLeaveRequest {
            pod: text(u)?,
            part: part(u)?,
            ..Default::default()
        }
        .write_to_bytes(),
        4 => {
            let mut m = pb::HostloPublishRequest {
                pod: text(u)?,
                part: part(u)?,
                ..Default::default()
            };
            for _ in 0..u.int_in_range(0..=4)? {
                m.ports.push(pb::HostloPort {
                    port: u32::arbitrary(u)?,
                    protocol: u.choose(&["tcp", "udp", "", "sctp"])?.to_string(),
                    ..Default::default()
                });
            }
            m.write_to_bytes()
        }
        _ => pb::HostloWatchRequest {
            pod: text(u)?,
            since_version: u64::arbitrary(u)?,
            timeout_ms: u32::arbitrary(u)?,
            ..Default::default()
        }
        .write_to_bytes(),
    };
    Ok(bytes.unwrap_or_default())
}

/// Built calls: as many as the input holds, at most 32.
fn built_calls(data: &[u8]) -> Vec<(&'static str, Call)> {
    let mut u = Unstructured::new(data);
    let mut calls = Vec::new();
    while calls.len() < 32 && !u.is_empty() {
        let Ok((vm, kind)) = <(u8, u8)>::arbitrary(&mut u) else {
            break;
        };
        let Ok(bytes) = built(kind, &mut u) else {
            break;
        };
        if let Some(call) = decode(kind, &bytes) {
            calls.push((VMS[usize::from(vm) % VMS.len()], call));
        }
    }
    calls
}

fuzz_target!(|data: &[u8]| {
    let calls = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 1 => built_calls(rest),
        Some((_, rest)) => raw_calls(rest),
        None => return,
    };
    if calls.is_empty() {
        return;
    }
    clear_state();
    let Ok(agent) = agent(config(), StalePolicy::Refuse) else {
        panic!("the agent does not start on an empty state");
    };
    runtime().block_on(async {
        for (vm, call) in calls {
            match call {
                Call::Attach(r) => {
                    if let Ok(a) = agent.attach(vm, r).await {
                        if let Some(net) = agent.network(&a.record.network) {
                            convert::nic(&a.record, &net);
                        }
                    }
                }
                Call::Detach(s) => {
                    let _ = agent.detach(vm, s).await;
                }
                Call::Join(j) => {
                    if let Ok((rec, view)) = agent.hostlo_join(vm, j.clone()).await {
                        convert::hostlo_nic(&rec, j.pod.as_str(), &agent.config().hostlo);
                        convert::hostlo_view(&view);
                    }
                }
                Call::Leave(p) => {
                    let _ = agent.hostlo_leave(vm, p).await;
                }
                Call::Publish(p) => {
                    if let Ok(c) = agent.hostlo_publish(vm, p).await {
                        for c in &c {
                            convert::hostlo_conflict(c);
                        }
                    }
                }
                Call::Watch(mut w) => {
                    // Long polls would only make the run slow.
                    w.timeout = Duration::ZERO;
                    if let Ok(v) = agent.hostlo_watch(vm, w).await {
                        convert::hostlo_view(&v);
                    }
                }
            }
        }
        replies(&agent);
        // And what a restart of the agent makes of the state it left.
        drop(agent);
        let again = nestless_fuzz::agent(config(), StalePolicy::Refuse)
            .unwrap_or_else(|e| panic!("the agent refuses its own state file: {e}"));
        let _ = again.recover().await;
        exercise(&again, VMS[0]).await;
    });
});
