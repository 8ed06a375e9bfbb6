//! The gRPC face of the dispatcher: the `PublishService` handlers and who
//! may publish what (errors become statuses in [`crate::error`]).

use std::sync::Arc;

use livemesh_mesh::auth;
use livemesh_proto::v1::publish_service_server::PublishService;
use livemesh_proto::v1::room_event::Kind;
use livemesh_proto::v1::{
    PublishBatchRequest, PublishBatchResponse, PublishRequest, PublishResponse, PublishResult,
};
use tonic::{Request, Response, Status};

use crate::dispatch::DispatcherInner;
use crate::error::PublishError;

/// The PublishService implementation.
#[derive(Debug, Clone)]
pub struct PublishApi {
    inner: Arc<DispatcherInner>,
    security: auth::Security,
}

impl PublishApi {
    pub fn new(inner: Arc<DispatcherInner>, security: auth::Security) -> Self {
        Self { inner, security }
    }
}

/// Who may publish what, beyond the RPC's policy, in every auth mode:
/// a room-ended event only a peer dispatcher forwarding its own (a
/// dispatcher stores the local one itself, when the rooms service reports
/// the end), a gift only the gift-settler (which announces a gift before
/// committing it) or a peer dispatcher forwarding one.
fn check_origin(
    kind: Option<&Kind>,
    forwarded: bool,
    caller: Option<&str>,
) -> Result<(), PublishError> {
    let from_peer = forwarded && caller == Some(auth::policy::PUBLISH);
    match kind {
        Some(Kind::RoomEnded(_)) if !from_peer => Err(PublishError::RoomEndedNotFromPeer),
        Some(Kind::Gift(_)) if !from_peer && caller != Some(auth::policy::GIFT_SETTLER) => {
            Err(PublishError::GiftNotFromSettler)
        }
        _ => Ok(()),
    }
}

/// The most events one `PublishBatch` takes.
const MAX_BATCH: usize = 1_024;

/// The result of one event of a batch.
fn result(answer: Result<PublishResponse, Status>) -> PublishResult {
    match answer {
        Ok(response) => PublishResult {
            code: 0,
            message: String::new(),
            response: Some(response),
        },
        Err(status) => PublishResult {
            // A code is 0 to 16.
            code: u32::try_from(status.code() as i32).unwrap_or(2),
            message: status.message().to_owned(),
            response: None,
        },
    }
}

#[tonic::async_trait]
impl PublishService for PublishApi {
    async fn publish_batch(
        &self,
        request: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        // The policy lets only mesh services call this when auth is
        // enforced; in dev mode the caller is taken at its word.
        let Some(caller) = auth::mesh_caller(&extensions, &metadata, &self.security) else {
            return Err(PublishError::BatchNotFromMesh.into());
        };
        if request.requests.len() > MAX_BATCH {
            return Err(PublishError::BatchTooLarge {
                len: request.requests.len(),
                max: MAX_BATCH,
            }
            .into());
        }
        let answers = request.requests.into_iter().map(|request| {
            let kind = request.event.as_ref().and_then(|e| e.kind.as_ref());
            let checked = match kind {
                Some(Kind::Comment(_)) => Err(PublishError::CommentInBatch),
                _ => check_origin(kind, request.forwarded_from.is_some(), Some(&caller)),
            };
            let inner = self.inner.clone();
            async move {
                checked?;
                Ok(inner.publish(request).await?)
            }
        });
        let results = futures::future::join_all(answers)
            .await
            .into_iter()
            .map(result)
            .collect();
        Ok(Response::new(PublishBatchResponse { results }))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let (metadata, extensions, mut request) = request.into_parts();
        let kind = request.event.as_ref().and_then(|e| e.kind.as_ref());
        if matches!(kind, Some(Kind::RoomEnded(_) | Kind::Gift(_))) {
            let caller = auth::mesh_caller(&extensions, &metadata, &self.security);
            check_origin(kind, request.forwarded_from.is_some(), caller.as_deref())?;
        }
        // A comment is a viewer's: its viewer comes from the viewer token.
        // Every other event is the mesh's own (totals, counts, gifts).
        match request.event.as_mut().and_then(|e| e.kind.as_mut()) {
            Some(Kind::Comment(comment)) => {
                comment.viewer_id =
                    auth::viewer_id(&extensions, comment.viewer_id, "event.comment.viewer_id")?;
            }
            _ => auth::require_mesh_service(&extensions, "publish events other than comments")?,
        }
        auth::check_room_publish(&extensions, request.room_id)?;
        Ok(Response::new(self.inner.publish(request).await?))
    }
}
