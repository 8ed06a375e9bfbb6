//! Room ends, told by ongoing-query's Watch stream: the dispatcher publishes
//! the room-ended event (once, whoever else also does).

use std::sync::Arc;
use std::time::Duration;

use livemesh_mesh::MeshChannel;
use livemesh_mesh::backoff::Backoff;
use livemesh_proto::v1::RoomChangeKind;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use tracing::Instrument as _;

use crate::dispatch::DispatcherInner;
use crate::error::PublishError;

/// Follows the Watch stream for as long as the future runs.
pub(crate) async fn follow(
    inner: Arc<DispatcherInner>,
    watch: OngoingQueryServiceClient<MeshChannel>,
) {
    livemesh_rooms::follow_changes(watch, |change| {
        if change.kind() != RoomChangeKind::Ended {
            return;
        }
        let Some(room) = change.room else {
            return;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            // Eight attempts, 100 ms doubling between them; the last
            // failure is logged by the back-off as given up.
            let mut backoff = Backoff::new(
                format!("publishing room {}'s room-ended event", room.room_id),
                Duration::from_millis(100),
                Duration::from_millis(100 << 6),
            )
            .with_retries(7);
            loop {
                match inner.end_room(room.room_id, room.ended_at).await {
                    Ok(_) | Err(PublishError::Ended { .. }) => return,
                    Err(err) => {
                        tracing::warn!(room_id = room.room_id, %err, "publishing room-ended failed; retrying");
                        if !backoff.wait().await {
                            return;
                        }
                    }
                }
            }
        }.in_current_span());
    })
    .await;
}
