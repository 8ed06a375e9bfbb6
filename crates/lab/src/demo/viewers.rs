//! The demo's viewers: one task per Subscribe stream, reporting what it
//! receives to the script, which keeps each stream's story ([`Viewer`]) and
//! waits on it ([`Audience::until`]).

use anyhow::{Context as _, bail};
use livemesh_mesh::MeshChannel;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    RoomEvent, StreamPosition, StreamStarted, SubscribeRequest, SubscribeResponse, room_event,
};
use tokio::sync::{mpsc, oneshot};

use super::VIEWER_WAIT;

/// Which of its events a viewer's task prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prints {
    Everything,
    StartAndEnd,
}

/// What a viewer's task received, reported to the script as it happens.
#[derive(Debug)]
enum Seen {
    Message(SubscribeResponse),
    /// The stream ended: cleanly, or with a status.
    Closed(Result<(), tonic::Status>),
}

/// One viewer stream as the script knows it: what its task reported.
#[derive(Debug, Default)]
pub(super) struct Viewer {
    pub(super) viewer_id: u64,
    resumed_from: Option<u64>,
    pub(super) started: Option<StreamStarted>,
    /// Offsets of the ordered events (comments, gifts, room ended), as received.
    pub(super) ordered: Vec<u64>,
    comments: u32,
    gifts: u32,
    love_totals: u32,
    pub(super) love_total: Option<u64>,
    viewer_counts: u32,
    pub(super) viewer_count: Option<u64>,
    /// The offset of the room-ended event.
    pub(super) room_ended: Option<u64>,
    /// The position of the last message received: where to resume.
    last: Option<StreamPosition>,
    /// How the stream ended: OK, or the status's code and message.
    pub(super) closed: Option<Result<(), String>>,
    /// The script dropped the stream, as a lost connection would.
    dropped: bool,
    /// Whatever broke the stream contract (an event before `started`, ...).
    pub(super) problems: Vec<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Viewer {
    fn apply(&mut self, seen: Seen) {
        let message = match seen {
            Seen::Message(SubscribeResponse { message, .. }) => message,
            Seen::Closed(result) => {
                self.closed =
                    Some(result.map_err(|s| format!("{:?} \"{}\"", s.code(), s.message())));
                return;
            }
        };
        let event = match message {
            Some(Message::Started(started)) => {
                if self.started.is_some() {
                    self.problems.push("a second StreamStarted".into());
                }
                self.last = started.position;
                self.started = Some(started);
                return;
            }
            Some(Message::Event(event)) => event,
            Some(Message::Batch(_)) => {
                self.problems
                    .push("a batch, though this viewer did not accept batches".into());
                return;
            }
            None => {
                self.problems
                    .push("a message with neither started nor event".into());
                return;
            }
        };
        if self.started.is_none() {
            self.problems.push(format!(
                "event at offset {} before StreamStarted",
                event.offset
            ));
        }
        if self.room_ended.is_some() {
            self.problems.push(format!(
                "event at offset {} after the room ended",
                event.offset
            ));
        }
        self.last = Some(StreamPosition {
            epoch: event.epoch,
            offset: event.offset,
        });
        match event.kind {
            Some(room_event::Kind::LoveTotal(love)) => {
                self.love_totals += 1;
                self.love_total = Some(love.total);
                return;
            }
            Some(room_event::Kind::ViewerCount(count)) => {
                self.viewer_counts += 1;
                self.viewer_count = Some(count.count);
                return;
            }
            Some(room_event::Kind::Comment(_)) => self.comments += 1,
            Some(room_event::Kind::Gift(_)) => self.gifts += 1,
            Some(room_event::Kind::RoomEnded(_)) => self.room_ended = Some(event.offset),
            None => {
                self.problems
                    .push(format!("event at offset {} without a kind", event.offset));
                return;
            }
        }
        if let Some(previous) = self.ordered.last().filter(|&&p| p >= event.offset) {
            self.problems
                .push(format!("offset {} after offset {previous}", event.offset));
        }
        self.ordered.push(event.offset);
    }

    pub(super) fn summary(&self) -> String {
        let mut text = format!("viewer {}", self.viewer_id);
        if let Some(offset) = self.resumed_from {
            text.push_str(&format!(" (resumed after {offset})"));
        }
        let last = |value: Option<u64>| value.map_or(String::new(), |v| format!(" (last {v})"));
        text.push_str(&format!(
            ": {}, {}, {}{}, {}{}",
            count(self.comments, "comment"),
            count(self.gifts, "gift"),
            count(self.love_totals, "love total"),
            last(self.love_total),
            count(self.viewer_counts, "viewer count"),
            last(self.viewer_count),
        ));
        if let Some(offset) = self.room_ended {
            text.push_str(&format!(", room ended at {offset}"));
        }
        let end = match (&self.closed, self.dropped) {
            (_, true) => format!(
                "connection dropped after offset {}",
                self.last.as_ref().map_or(0, |p| p.offset)
            ),
            (Some(Ok(())), _) => "stream closed".into(),
            (Some(Err(status)), _) => format!("stream failed: {status}"),
            (None, false) => "stream still open".into(),
        };
        format!("{text}; {end}")
    }
}

/// `1 comment`, `2 comments`.
fn count(n: u32, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Streams that the script has not dropped.
pub(super) fn live(all: &[Viewer]) -> impl Iterator<Item = &Viewer> {
    all.iter().filter(|v| !v.dropped)
}

/// The viewers of one room: one task per stream, reporting to the script.
pub(super) struct Audience {
    pub(super) client: SubscribeServiceClient<MeshChannel>,
    pub(super) room_id: u64,
    sender: mpsc::UnboundedSender<(usize, Seen)>,
    reports: mpsc::UnboundedReceiver<(usize, Seen)>,
    pub(super) viewers: Vec<Viewer>,
}

impl Audience {
    pub(super) fn new(channel: MeshChannel, room_id: u64) -> Self {
        let (sender, reports) = mpsc::unbounded_channel();
        Self {
            client: SubscribeServiceClient::new(channel),
            room_id,
            sender,
            reports,
            viewers: Vec::new(),
        }
    }

    /// Subscribes `viewer_id` and starts the task that follows its stream;
    /// returns the stream's index in `viewers`.
    pub(super) async fn open(
        &mut self,
        viewer_id: u64,
        resume: Option<StreamPosition>,
        prints: Prints,
    ) -> anyhow::Result<usize> {
        let resumed_from = resume.as_ref().map(|p| p.offset);
        let stream = self
            .client
            .subscribe(SubscribeRequest {
                room_id: self.room_id,
                viewer_id,
                resume,
                accept_batches: false,
                stamp_writes: false,
            })
            .await
            .with_context(|| format!("viewer {viewer_id} subscribing to room {}", self.room_id))?
            .into_inner();
        let index = self.viewers.len();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(follow(
            (index, viewer_id),
            prints,
            stream,
            stopped,
            self.sender.clone(),
        ));
        self.viewers.push(Viewer {
            viewer_id,
            resumed_from,
            stop: Some(stop),
            task: Some(task),
            ..Viewer::default()
        });
        Ok(index)
    }

    /// Takes in the viewers' reports until `done` holds (within `VIEWER_WAIT`).
    pub(super) async fn until(
        &mut self,
        what: &str,
        done: impl Fn(&[Viewer]) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + VIEWER_WAIT;
        while !done(&self.viewers) {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some((index, seen))) => self.viewers[index].apply(seen),
                Ok(None) => bail!("{what}: the viewer reports ended"),
                Err(_) => {
                    let so_far: Vec<String> = self.viewers.iter().map(Viewer::summary).collect();
                    bail!("{what}: not within {VIEWER_WAIT:?}; so far {so_far:?}");
                }
            }
        }
        Ok(())
    }

    /// Drops a stream as a lost connection would; returns the position of
    /// the last message it received.
    pub(super) async fn drop_connection(&mut self, index: usize) -> anyhow::Result<StreamPosition> {
        let viewer = &mut self.viewers[index];
        if let Some(stop) = viewer.stop.take() {
            let _ = stop.send(());
        }
        let task = viewer.task.take().context("the stream has no task")?;
        tokio::time::timeout(VIEWER_WAIT, task)
            .await
            .context("the viewer task did not stop")??;
        // Everything it received was reported before it stopped.
        while let Ok((index, seen)) = self.reports.try_recv() {
            self.viewers[index].apply(seen);
        }
        let viewer = &mut self.viewers[index];
        viewer.dropped = true;
        viewer.last.context("the dropped stream received nothing")
    }

    /// Waits until every stream that was not dropped has ended, and for
    /// their tasks.
    pub(super) async fn closed(&mut self) -> anyhow::Result<()> {
        self.until("every viewer stream ends", |all| {
            live(all).all(|v| v.closed.is_some())
        })
        .await?;
        for viewer in &mut self.viewers {
            if let Some(task) = viewer.task.take() {
                tokio::time::timeout(VIEWER_WAIT, task)
                    .await
                    .context("a viewer task did not finish")??;
            }
        }
        Ok(())
    }
}

/// One viewer's task: reads its stream, prints what it sees, reports it,
/// until the stream ends or the script drops it.
async fn follow(
    (index, viewer_id): (usize, u64),
    prints: Prints,
    mut stream: tonic::Streaming<SubscribeResponse>,
    mut stop: oneshot::Receiver<()>,
    reports: mpsc::UnboundedSender<(usize, Seen)>,
) {
    loop {
        let seen = tokio::select! {
            // Sent, or the script is gone: drop the stream.
            _ = &mut stop => return,
            message = stream.message() => match message {
                Ok(Some(message)) => Seen::Message(message),
                Ok(None) => Seen::Closed(Ok(())),
                Err(status) => Seen::Closed(Err(status)),
            },
        };
        let edge = match &seen {
            Seen::Closed(_) => true,
            Seen::Message(SubscribeResponse { message, .. }) => match message {
                Some(Message::Started(_)) => true,
                Some(Message::Event(event)) => {
                    matches!(event.kind, Some(room_event::Kind::RoomEnded(_)))
                }
                Some(Message::Batch(_)) | None => true,
            },
        };
        if prints == Prints::Everything || edge {
            println!("  viewer {viewer_id} sees: {}", describe_seen(&seen));
        }
        let closed = matches!(seen, Seen::Closed(_));
        if reports.send((index, seen)).is_err() || closed {
            return;
        }
    }
}

fn describe_seen(seen: &Seen) -> String {
    let message = match seen {
        Seen::Closed(Ok(())) => return "end of stream (OK)".into(),
        Seen::Closed(Err(status)) => {
            return format!(
                "the stream fails: {:?} \"{}\"",
                status.code(),
                status.message()
            );
        }
        Seen::Message(SubscribeResponse { message, .. }) => message,
    };
    let event = match message {
        Some(Message::Started(started)) => {
            let (epoch, offset) = started
                .position
                .as_ref()
                .map_or((0, 0), |p| (p.epoch, p.offset));
            let mut text = format!("stream started at offset {offset} (epoch {epoch})");
            if started.recovered || started.epoch_changed || started.replayed > 0 {
                text.push_str(&format!(
                    ", recovered: {}, epoch_changed: {}, {} replayed",
                    started.recovered, started.epoch_changed, started.replayed
                ));
            }
            return text;
        }
        Some(Message::Event(event)) => event,
        Some(Message::Batch(batch)) => return format!("a batch of {} events", batch.events.len()),
        None => return "an empty message".into(),
    };
    describe_event(event)
}

fn describe_event(event: &RoomEvent) -> String {
    let offset = event.offset;
    match &event.kind {
        Some(room_event::Kind::Comment(c)) => {
            format!(
                "comment from {} {:?} (offset {offset})",
                c.viewer_id, c.text
            )
        }
        Some(room_event::Kind::Gift(g)) => format!(
            "gift {} from {}, amount {} (transfer {}, offset {offset})",
            g.gift_id, g.viewer_id, g.amount, g.transfer_id
        ),
        Some(room_event::Kind::LoveTotal(love)) => format!("love total {}", love.total),
        Some(room_event::Kind::ViewerCount(count)) => format!("viewers {}", count.count),
        Some(room_event::Kind::RoomEnded(_)) => format!("room ended (offset {offset})"),
        None => format!("an event without a kind (offset {offset})"),
    }
}
