//! `gift-settler`: gifts, balances and settlement.
//!
//! The gift-settler issue builds the sharded ledger; until then the service
//! serves health and reflection and answers its RPCs with `UNIMPLEMENTED`
//! naming that work.

use futures::stream::BoxStream;
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ShutdownSignal, not_yet_implemented};
use livemesh_proto::v1::gifts_service_server::{GiftsService, GiftsServiceServer};
use livemesh_proto::v1::settlement_service_server::{SettlementService, SettlementServiceServer};
use livemesh_proto::v1::{
    DepositRequest, DepositResponse, ExportLedgerRequest, ExportLedgerResponse, GetBalanceRequest,
    GetBalanceResponse, GetSettlementRequest, GetSettlementResponse, ReconcileRequest,
    ReconcileResponse, SendGiftRequest, SendGiftResponse, SettleRoomRequest, SettleRoomResponse,
};
use tonic::{Request, Response, Status};

const OWNER: &str = "the gift-settler work (issue 6)";

/// The gift and settlement service.
#[derive(Debug, Clone, Default)]
pub struct GiftSettler;

#[tonic::async_trait]
impl GiftsService for GiftSettler {
    async fn deposit(
        &self,
        _request: Request<DepositRequest>,
    ) -> Result<Response<DepositResponse>, Status> {
        Err(not_yet_implemented("GiftsService.Deposit", OWNER))
    }

    async fn send_gift(
        &self,
        _request: Request<SendGiftRequest>,
    ) -> Result<Response<SendGiftResponse>, Status> {
        Err(not_yet_implemented("GiftsService.SendGift", OWNER))
    }

    async fn get_balance(
        &self,
        _request: Request<GetBalanceRequest>,
    ) -> Result<Response<GetBalanceResponse>, Status> {
        Err(not_yet_implemented("GiftsService.GetBalance", OWNER))
    }
}

#[tonic::async_trait]
impl SettlementService for GiftSettler {
    type ExportLedgerStream = BoxStream<'static, Result<ExportLedgerResponse, Status>>;

    async fn settle_room(
        &self,
        _request: Request<SettleRoomRequest>,
    ) -> Result<Response<SettleRoomResponse>, Status> {
        Err(not_yet_implemented("SettlementService.SettleRoom", OWNER))
    }

    async fn get_settlement(
        &self,
        _request: Request<GetSettlementRequest>,
    ) -> Result<Response<GetSettlementResponse>, Status> {
        Err(not_yet_implemented(
            "SettlementService.GetSettlement",
            OWNER,
        ))
    }

    async fn reconcile(
        &self,
        _request: Request<ReconcileRequest>,
    ) -> Result<Response<ReconcileResponse>, Status> {
        Err(not_yet_implemented("SettlementService.Reconcile", OWNER))
    }

    async fn export_ledger(
        &self,
        _request: Request<ExportLedgerRequest>,
    ) -> Result<Response<Self::ExportLedgerStream>, Status> {
        Err(not_yet_implemented("SettlementService.ExportLedger", OWNER))
    }
}

impl ServiceSet for GiftSettler {
    fn register(&self, server: &mut ServerBuilder) {
        server.add_service(GiftsServiceServer::new(self.clone()));
        server.add_service(SettlementServiceServer::new(self.clone()));
    }
}

/// Serves the gift-settler on `listener` until `shutdown`.
pub async fn run(
    settler: GiftSettler,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(settler, listener, shutdown).await
}
