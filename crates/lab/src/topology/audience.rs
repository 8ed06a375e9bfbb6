//! The viewers' streams: what each one showed, resumed on another node when
//! its node died.

use anyhow::{Context as _, bail};
use livemesh_mesh::MeshChannel;
use livemesh_mesh::auth::TokenKeys;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{Comment, StreamPosition, SubscribeRequest, room_event};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::{RETRY_FOR, SETTLE, viewer_request};

/// What one viewer's stream showed.
#[derive(Debug, Clone, Default)]
pub(super) struct ViewerLog {
    pub(super) room_id: u64,
    pub(super) viewer_id: u64,
    /// The subscribe node it is on now.
    pub(super) node: usize,
    pub(super) started: bool,
    /// Joined after the chaos: checked from its start position on.
    pub(super) late: bool,
    /// The offset of its first start (a late viewer sees what follows).
    pub(super) start_offset: u64,
    /// Comments and gifts, as (offset, text) in the order received.
    pub(super) ordered: Vec<(u64, String)>,
    /// Its stream broke and it resumed: on which node, after what.
    pub(super) resumes: Vec<String>,
    /// Resumes whose start said not every missed event was replayed.
    pub(super) unrecovered: Vec<String>,
    pub(super) ended: bool,
    pub(super) closed: Option<Result<(), (tonic::Code, String)>>,
}

/// Every viewer's log, and a signal that bumps on each change.
#[derive(Clone)]
pub(super) struct Audience {
    pub(super) logs: Arc<Mutex<BTreeMap<u64, ViewerLog>>>,
    pub(super) changed: watch::Sender<u64>,
    /// The subscribe nodes viewers join and resume on.
    pub(super) subscribers: Vec<SubscribeServiceClient<MeshChannel>>,
    pub(super) keys: Option<TokenKeys>,
}

impl Default for Audience {
    fn default() -> Self {
        Self {
            logs: Arc::default(),
            changed: watch::channel(0).0,
            subscribers: Vec::new(),
            keys: None,
        }
    }
}

/// A stream ending with one of these is a broken connection or a node
/// going away: a client resumes elsewhere from its last position.
fn resumable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
            | tonic::Code::DeadlineExceeded
    )
}

impl Audience {
    /// Opens `viewer_id`'s stream on subscribe node `node` and follows it
    /// (resuming on another node when it breaks).
    pub(super) async fn join(
        &self,
        room_id: u64,
        viewer_id: u64,
        node: usize,
        late: bool,
    ) -> anyhow::Result<()> {
        let node = node % self.subscribers.len();
        let stream = self
            .open(room_id, viewer_id, node, None)
            .await
            .with_context(|| format!("viewer {viewer_id} subscribing on subscribe node {node}"))?;
        self.update(viewer_id, |log| {
            *log = ViewerLog {
                room_id,
                viewer_id,
                node,
                late,
                ..ViewerLog::default()
            }
        });
        let audience = self.clone();
        tokio::spawn(async move { audience.follow(room_id, viewer_id, node, stream).await });
        Ok(())
    }

    async fn open(
        &self,
        room_id: u64,
        viewer_id: u64,
        node: usize,
        resume: Option<StreamPosition>,
    ) -> Result<tonic::Streaming<livemesh_proto::v1::SubscribeResponse>, tonic::Status> {
        let request = viewer_request(
            self.keys.as_ref(),
            viewer_id,
            SubscribeRequest {
                room_id,
                viewer_id,
                resume,
                ..SubscribeRequest::default()
            },
        )
        .map_err(|err| tonic::Status::internal(format!("{err:#}")))?;
        Ok(self.subscribers[node]
            .clone()
            .subscribe(request)
            .await?
            .into_inner())
    }

    async fn follow(
        &self,
        room_id: u64,
        viewer_id: u64,
        mut node: usize,
        mut stream: tonic::Streaming<livemesh_proto::v1::SubscribeResponse>,
    ) {
        // The last position received: a safe resume point on any node.
        let mut last: Option<StreamPosition> = None;
        let mut resuming = false;
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    self.update(viewer_id, |log| match response.message {
                        Some(Message::Started(started)) => {
                            if resuming && !started.recovered {
                                log.unrecovered
                                    .push(format!("on node {node} from {last:?}: {started:?}"));
                            }
                            if !log.started {
                                log.start_offset =
                                    started.position.as_ref().map_or(0, |p| p.offset);
                            }
                            if last.is_none() {
                                last = started.position;
                            }
                            log.started = true;
                            resuming = false;
                        }
                        Some(Message::Event(event)) => {
                            let text = match event.kind {
                                Some(room_event::Kind::Comment(Comment { text, .. })) => Some(text),
                                Some(room_event::Kind::Gift(gift)) => {
                                    Some(gift_text(&gift.transfer_id))
                                }
                                Some(room_event::Kind::RoomEnded(_)) => {
                                    log.ended = true;
                                    None
                                }
                                _ => None,
                            };
                            if let Some(text) = text {
                                log.ordered.push((event.offset, text));
                                last = Some(StreamPosition {
                                    epoch: event.epoch,
                                    offset: event.offset,
                                });
                            }
                        }
                        // This viewer does not accept batches.
                        Some(Message::Batch(_)) | None => {}
                    })
                }
                Ok(None) => {
                    self.update(viewer_id, |log| log.closed = Some(Ok(())));
                    return;
                }
                Err(status) => {
                    let ended = self.snapshot().get(&viewer_id).is_some_and(|v| v.ended);
                    if ended || !resumable(status.code()) {
                        self.update(viewer_id, |log| {
                            log.closed = Some(Err((status.code(), status.message().to_owned())));
                        });
                        return;
                    }
                    // Resume on the next node, as a client would; the node
                    // may be restarting too: keep trying the others.
                    let broke = format!("{:?} on node {node}", status.code());
                    let deadline = Instant::now() + RETRY_FOR;
                    let resumed = loop {
                        node = (node + 1) % self.subscribers.len();
                        match self.open(room_id, viewer_id, node, last).await {
                            Ok(resumed) => break Ok(resumed),
                            Err(status)
                                if (resumable(status.code())
                                    || status.code() == tonic::Code::ResourceExhausted)
                                    && Instant::now() < deadline =>
                            {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(status) => break Err(status),
                        }
                    };
                    match resumed {
                        Ok(resumed) => {
                            stream = resumed;
                            resuming = true;
                            self.update(viewer_id, |log| {
                                log.node = node;
                                log.resumes.push(format!(
                                    "{broke}, resumed on node {node} from offset {}",
                                    last.map_or(0, |p| p.offset)
                                ));
                            });
                        }
                        Err(status) => {
                            self.update(viewer_id, |log| {
                                log.closed = Some(Err((
                                    status.code(),
                                    format!("resuming after {broke}: {}", status.message()),
                                )));
                            });
                            return;
                        }
                    }
                }
            }
        }
    }

    fn update(&self, viewer_id: u64, change: impl FnOnce(&mut ViewerLog)) {
        change(
            self.logs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(viewer_id)
                .or_default(),
        );
        self.changed.send_modify(|n| *n += 1);
    }

    pub(super) fn snapshot(&self) -> BTreeMap<u64, ViewerLog> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `done` holds of the logs, at most [`SETTLE`].
    pub(super) async fn until(
        &self,
        what: &str,
        done: impl Fn(&BTreeMap<u64, ViewerLog>) -> bool,
    ) -> anyhow::Result<()> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            if done(&self.snapshot()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let stuck: Vec<String> = self
                    .snapshot()
                    .values()
                    .map(|v| {
                        format!(
                            "viewer {} room {} node {}: started {}, {} ordered, ended {}, closed {:?}",
                            v.viewer_id,
                            v.room_id,
                            v.node,
                            v.started,
                            v.ordered.len(),
                            v.ended,
                            v.closed
                        )
                    })
                    .collect();
                bail!("{what}: not within {SETTLE:?}:\n  {}", stuck.join("\n  "));
            }
        }
    }
}

pub(super) fn gift_text(transfer_id: &str) -> String {
    format!("gift {transfer_id}")
}
