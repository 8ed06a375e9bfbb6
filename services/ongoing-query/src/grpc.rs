//! The gRPC face of the room slice: `OngoingQueryService` and
//! `RoomAdminService`, handlers only (errors become statuses in
//! [`crate::error`]).

use std::sync::Arc;

use futures::stream::BoxStream;
use livemesh_proto::v1::ongoing_query_service_server::OngoingQueryService;
use livemesh_proto::v1::room_admin_service_server::RoomAdminService;
use livemesh_proto::v1::{
    EndRoomRequest, EndRoomResponse, GetRoomRequest, GetRoomResponse, ListOngoingRequest,
    ListOngoingResponse, PartitionRequest, PartitionResponse, StartRoomRequest, StartRoomResponse,
    WatchRequest, WatchResponse,
};
use tonic::{Request, Response, Status};

use crate::rooms::Rooms;

/// Both room services over one [`Rooms`].
#[derive(Debug, Clone)]
pub struct RoomsApi {
    rooms: Arc<Rooms>,
    stopping: livemesh_mesh::Shutdown,
}

impl RoomsApi {
    /// `stopping` fires when the server shuts down; Watch streams end then.
    pub fn new(rooms: Arc<Rooms>, stopping: livemesh_mesh::Shutdown) -> Self {
        Self { rooms, stopping }
    }
}

#[tonic::async_trait]
impl OngoingQueryService for RoomsApi {
    type WatchStream = BoxStream<'static, Result<WatchResponse, Status>>;

    async fn get_room(
        &self,
        request: Request<GetRoomRequest>,
    ) -> Result<Response<GetRoomResponse>, Status> {
        let room = self.rooms.get_room(request.into_inner().room_id).await?;
        Ok(Response::new(GetRoomResponse {
            room: Some(room.into()),
        }))
    }

    async fn list_ongoing(
        &self,
        request: Request<ListOngoingRequest>,
    ) -> Result<Response<ListOngoingResponse>, Status> {
        let request = request.into_inner();
        let (rooms, next_page_token) = self
            .rooms
            .list_ongoing(request.page_size, &request.page_token)?;
        Ok(Response::new(ListOngoingResponse {
            rooms: rooms.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn partition(
        &self,
        request: Request<PartitionRequest>,
    ) -> Result<Response<PartitionResponse>, Status> {
        let request = request.into_inner();
        let room_ids = self.rooms.partition(request.index, request.total)?;
        Ok(Response::new(PartitionResponse { room_ids }))
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let start = crate::watch::start_for(&self.rooms, request.get_ref().from.as_ref())?;
        let changes = crate::watch::spawn(self.rooms.clone(), start, self.stopping.signal());
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(changes),
        )))
    }
}

#[tonic::async_trait]
impl RoomAdminService for RoomsApi {
    async fn start_room(
        &self,
        request: Request<StartRoomRequest>,
    ) -> Result<Response<StartRoomResponse>, Status> {
        let room = self
            .rooms
            .start_room(request.into_inner().anchor_id)
            .await?;
        Ok(Response::new(StartRoomResponse {
            room: Some(room.into()),
        }))
    }

    async fn end_room(
        &self,
        request: Request<EndRoomRequest>,
    ) -> Result<Response<EndRoomResponse>, Status> {
        let room = self.rooms.end_room(request.into_inner().room_id).await?;
        Ok(Response::new(EndRoomResponse {
            room: Some(room.into()),
        }))
    }
}
