//! The gRPC face of the gift-settler: `GiftsService` and
//! `SettlementService`, handlers only; the domain is in [`crate::gifts`],
//! [`crate::settle`] and [`crate::finance`], and errors become statuses in
//! [`crate::error`].

use std::sync::Arc;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use livemesh_mesh::auth;
use livemesh_proto::time::{ms_from_timestamp, timestamp_from_ms};
use livemesh_proto::v1::gifts_service_server::GiftsService;
use livemesh_proto::v1::settlement_service_server::SettlementService;
use livemesh_proto::v1::{
    DepositRequest, DepositResponse, ExportLedgerRequest, ExportLedgerResponse, GetBalanceRequest,
    GetBalanceResponse, GetSettlementRequest, GetSettlementResponse, LedgerEntry, ReconcileRequest,
    ReconcileResponse, SendGiftRequest, SendGiftResponse, SettleRoomRequest, SettleRoomResponse,
    Settlement, SettlementState,
};
use tonic::{Request, Response, Status};

use crate::error::GiftError;
use crate::gifts::{Deposit, Gift, Inner};
use crate::store::{EntryRow, SettlementRow};

/// GiftsService and SettlementService.
#[derive(Debug, Clone)]
pub(crate) struct GiftsApi {
    inner: Arc<Inner>,
}

impl GiftsApi {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }
}

#[tonic::async_trait]
impl GiftsService for GiftsApi {
    async fn deposit(
        &self,
        request: Request<DepositRequest>,
    ) -> Result<Response<DepositResponse>, Status> {
        let r = request.into_inner();
        let applied = self
            .inner
            .deposit(Deposit {
                user_id: r.user_id,
                amount: r.amount,
                idempotency_key: &r.idempotency_key,
            })
            .await?;
        Ok(Response::new(DepositResponse {
            transfer_id: applied.transfer_id,
            balance: applied.balance,
        }))
    }

    async fn send_gift(
        &self,
        request: Request<SendGiftRequest>,
    ) -> Result<Response<SendGiftResponse>, Status> {
        let (_, extensions, r) = request.into_parts();
        let viewer_id = auth::viewer_id(&extensions, r.viewer_id, "viewer_id")?;
        let applied = self
            .inner
            .send_gift(Gift {
                viewer_id,
                room_id: r.room_id,
                gift_id: r.gift_id,
                amount: r.amount,
                idempotency_key: &r.idempotency_key,
            })
            .await?;
        Ok(Response::new(SendGiftResponse {
            transfer_id: applied.transfer_id,
            balance: applied.balance,
        }))
    }

    async fn get_balance(
        &self,
        request: Request<GetBalanceRequest>,
    ) -> Result<Response<GetBalanceResponse>, Status> {
        let (_, extensions, request) = request.into_parts();
        let user_id = auth::viewer_id(&extensions, request.user_id, "user_id")?;
        let balance = self.inner.balance(user_id).await?;
        Ok(Response::new(GetBalanceResponse { user_id, balance }))
    }
}

#[tonic::async_trait]
impl SettlementService for GiftsApi {
    type ExportLedgerStream = BoxStream<'static, Result<ExportLedgerResponse, Status>>;

    async fn settle_room(
        &self,
        request: Request<SettleRoomRequest>,
    ) -> Result<Response<SettleRoomResponse>, Status> {
        let room_id = request.into_inner().room_id;
        let info = self.inner.ended_room(room_id).await?;
        let row = self
            .inner
            .settle(room_id, info.anchor_id, &|_| false)
            .await
            .map_err(|source| GiftError::Settle { room_id, source })?;
        Ok(Response::new(SettleRoomResponse {
            settlement: Some(settlement(&row)),
        }))
    }

    async fn get_settlement(
        &self,
        request: Request<GetSettlementRequest>,
    ) -> Result<Response<GetSettlementResponse>, Status> {
        let row = self.inner.settlement(request.into_inner().room_id).await?;
        Ok(Response::new(GetSettlementResponse {
            settlement: Some(settlement(&row)),
        }))
    }

    async fn reconcile(
        &self,
        request: Request<ReconcileRequest>,
    ) -> Result<Response<ReconcileResponse>, Status> {
        let room_id = request.into_inner().room_id;
        Ok(Response::new(self.inner.statement(room_id).await?))
    }

    async fn export_ledger(
        &self,
        request: Request<ExportLedgerRequest>,
    ) -> Result<Response<Self::ExportLedgerStream>, Status> {
        let request = request.into_inner();
        let from = request.from.as_ref().map_or(0, ms_from_timestamp);
        let to = request.to.as_ref().map_or(i64::MAX, ms_from_timestamp);
        let entries = self.inner.entries(from, to)?;
        Ok(Response::new(Box::pin(entries.map(|entry| {
            let (shard, entry) = entry?;
            Ok(ExportLedgerResponse {
                entry: Some(ledger_entry(shard, entry)),
            })
        }))))
    }
}

fn ledger_entry(shard: u32, entry: EntryRow) -> LedgerEntry {
    LedgerEntry {
        transfer_id: entry.transfer_id,
        shard,
        account: entry.account,
        amount: entry.amount,
        created_at: Some(timestamp_from_ms(entry.created_at_ms)),
        kind: entry.kind,
    }
}

fn settlement(row: &SettlementRow) -> Settlement {
    let state = match row.state.as_str() {
        "settled" => SettlementState::Settled,
        "in_progress" => SettlementState::InProgress,
        _ => SettlementState::Pending,
    };
    Settlement {
        room_id: row.room_id,
        streamer_id: row.streamer_id,
        state: state.into(),
        gross: row.gross,
        platform_cut: row.platform_cut,
        streamer_credit: row.streamer_credit,
        settled_at: row.settled_at_ms.map(timestamp_from_ms),
    }
}
