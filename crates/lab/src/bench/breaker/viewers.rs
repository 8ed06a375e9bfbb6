//! The bench's viewers: Subscribe streams that time every comment from its
//! send time to its arrival.

use crate::bench::helpers::now_ns;
use livemesh_mesh::lock;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{SubscribeRequest, room_event};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

use super::PHASES;

/// What one viewer received.
pub(super) struct Viewer {
    pub(super) node: usize,
    pub(super) ready: AtomicU64,
    /// Per phase: (sequence number, publish→receive latency).
    pub(super) received: Mutex<[Vec<(u64, Duration)>; 2]>,
    pub(super) ended: Mutex<Option<String>>,
}

impl Viewer {
    pub(super) fn count(&self, phase: usize) -> usize {
        lock(&self.received)[phase].len()
    }
}

/// A bench comment's text: `brk <phase> <seq> <send time ns>`.
pub(super) fn comment_text(phase: usize, seq: u64, sent_ns: u64) -> String {
    format!("brk {phase} {seq} {sent_ns}")
}

pub(super) fn parse_comment(text: &str) -> Option<(usize, u64, u64)> {
    let mut parts = text.strip_prefix("brk ")?.split(' ');
    let phase = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    (parts.next().is_none() && phase < PHASES.len()).then_some((phase, seq, sent))
}

/// Opens a stream, reports once `started` arrived, then records comments.
pub(super) async fn view(
    mut client: SubscribeServiceClient<Channel>,
    request: SubscribeRequest,
    viewer: Arc<Viewer>,
    opened: tokio::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut stream = match client.subscribe(request).await {
        Ok(reply) => reply.into_inner(),
        Err(status) => {
            let _ = opened.send(Err(format!("Subscribe: {status}"))).await;
            return;
        }
    };
    match stream.message().await {
        Ok(Some(first)) if matches!(first.message, Some(Message::Started(_))) => {
            let _ = opened.send(Ok(())).await;
        }
        other => {
            let _ = opened
                .send(Err(format!("the stream did not start: {other:?}")))
                .await;
            return;
        }
    }
    drop(opened);
    let why = loop {
        match stream.message().await {
            Ok(Some(reply)) => {
                let Some(Message::Event(event)) = reply.message else {
                    continue;
                };
                let Some(room_event::Kind::Comment(comment)) = &event.kind else {
                    continue; // viewer counts and love totals
                };
                if let Some((phase, seq, sent)) = parse_comment(&comment.text) {
                    let latency = Duration::from_nanos(now_ns().saturating_sub(sent));
                    lock(&viewer.received)[phase].push((seq, latency));
                } else if comment.text.starts_with("ready ") {
                    viewer.ready.fetch_add(1, Ordering::Release);
                }
            }
            Ok(None) => break "the server ended the stream".to_owned(),
            Err(status) => break format!("the stream failed: {status}"),
        }
    };
    *lock(&viewer.ended) = Some(why);
}
