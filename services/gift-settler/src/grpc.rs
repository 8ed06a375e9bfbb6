//! The gRPC face of the gift-settler; errors become statuses here only.

use std::sync::Arc;

use futures::stream::BoxStream;
use livemesh_mesh::auth;
use livemesh_proto::time::{ms_from_timestamp, timestamp_from_ms};
use livemesh_proto::v1::gifts_service_server::GiftsService;
use livemesh_proto::v1::settlement_service_server::SettlementService;
use livemesh_proto::v1::{
    DepositRequest, DepositResponse, ExportLedgerRequest, ExportLedgerResponse, GetBalanceRequest,
    GetBalanceResponse, GetSettlementRequest, GetSettlementResponse, LedgerEntry, ReconcileRequest,
    ReconcileResponse, SendGiftRequest, SendGiftResponse, SettleRoomRequest, SettleRoomResponse,
    Settlement, SettlementState, ShardStatement,
};
use livemesh_rooms::LookupError;
use tonic::{Request, Response, Status};

use crate::Inner;
use crate::ledger::{
    EXTERNAL, EntryRow, GiftNotice, LedgerError, SettlementRow, Transfer, room_account,
    user_account,
};
const MAX_KEY_BYTES: usize = 128;
/// Tries of one transfer against concurrent conflicts (deadlocks, a racing
/// request with the same key) before answering UNAVAILABLE.
const TRIES: usize = 5;

/// Why a gift or deposit was refused.
#[derive(Debug, thiserror::Error)]
pub enum GiftError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("balance database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<GiftError> for Status {
    fn from(err: GiftError) -> Self {
        match &err {
            GiftError::Invalid(_) => Status::invalid_argument(err.to_string()),
            GiftError::Lookup(LookupError::NotFound(_)) => Status::not_found(err.to_string()),
            GiftError::Ledger(LedgerError::Insufficient { .. } | LedgerError::RoomEnded(_)) => {
                Status::failed_precondition(err.to_string())
            }
            GiftError::Ledger(LedgerError::BalanceLimit { .. }) => {
                Status::out_of_range(err.to_string())
            }
            GiftError::Ledger(LedgerError::Constraint(_)) => {
                // Logged with the transfer id where the database refused it.
                Status::failed_precondition(
                    "the transfer would break a rule of the ledger (a balance below zero or \
                     out of range); it was not applied and a retry is refused the same way",
                )
            }
            GiftError::Ledger(LedgerError::Rejected(_)) => {
                tracing::error!(%err, "the balance database refused a transfer");
                Status::internal(
                    "the balance database refused the transfer; it was not applied (the \
                     operators have the cause in the log)",
                )
            }
            GiftError::Ledger(LedgerError::KeyReused { .. }) => {
                Status::already_exists(err.to_string())
            }
            GiftError::Ledger(LedgerError::Unannounced(_)) => {
                tracing::warn!(%err, "a gift was not applied: its event was not taken");
                Status::unavailable(
                    "the room's event stream did not take the gift, so it was not applied; \
                     retry with the same idempotency_key",
                )
            }
            GiftError::Lookup(LookupError::Unavailable(_))
            | GiftError::Ledger(
                LedgerError::Conflict
                | LedgerError::RoomNotOpen(_)
                | LedgerError::Db(_)
                | LedgerError::Unavailable(_),
            )
            | GiftError::Db(_) => {
                tracing::warn!(%err, "gift or deposit failed");
                Status::unavailable(
                    "the balance store is unavailable right now; retry with the same idempotency_key",
                )
            }
        }
    }
}

/// GiftsService and SettlementService.
#[derive(Debug, Clone)]
pub struct GiftsApi {
    inner: Arc<Inner>,
}

impl GiftsApi {
    pub fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }
}

fn check_key(key: &str) -> Result<(), GiftError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(GiftError::Invalid(format!(
            "idempotency_key must be 1 to {MAX_KEY_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_amount(amount: i64, max: i64) -> Result<(), GiftError> {
    if amount <= 0 {
        return Err(GiftError::Invalid(format!(
            "amount must be positive (in the smallest currency unit), not {amount}"
        )));
    }
    if amount > max {
        return Err(GiftError::Invalid(format!(
            "amount {amount} is above the largest single transfer, {max} \
             (gifts.max_transfer_amount); send a smaller amount"
        )));
    }
    Ok(())
}

/// The sub-account of a room a viewer's gifts credit: the viewer's lane
/// (see `batch`), so concurrent batches never queue on one sub-account.
fn subaccount(viewer_id: u64, subaccounts: u32) -> u32 {
    u32::try_from(crate::batch::lane(viewer_id) % u64::from(subaccounts.max(1))).unwrap_or(0)
}

impl GiftsApi {
    /// Applies `transfer` in the user's shard, retrying conflicts, opening
    /// the room there first if it is not yet.
    async fn apply(
        &self,
        user_id: u64,
        transfer: &Transfer,
    ) -> Result<crate::ledger::Applied, GiftError> {
        let shard = self.inner.shard(user_id);
        let mut last = LedgerError::Conflict;
        for _ in 0..TRIES {
            match self.inner.apply(user_id, transfer.clone()).await {
                Ok(applied) => return Ok(applied),
                Err(LedgerError::RoomNotOpen(room_id)) => {
                    // The Watch has not opened it here yet; the room was
                    // checked ongoing just before.
                    shard
                        .open_room(room_id, self.inner.subaccounts, livemesh_mesh::now_ms())
                        .await?;
                    last = LedgerError::RoomNotOpen(room_id);
                }
                Err(LedgerError::Conflict) => last = LedgerError::Conflict,
                Err(other) => return Err(other.into()),
            }
        }
        Err(last.into())
    }

    async fn send_gift_inner(&self, r: SendGiftRequest) -> Result<SendGiftResponse, GiftError> {
        check_key(&r.idempotency_key)?;
        check_amount(r.amount, self.inner.max_transfer_amount)?;
        if r.viewer_id == 0 || r.room_id == 0 {
            return Err(GiftError::Invalid(
                "viewer_id and room_id are required".into(),
            ));
        }
        let room = self.inner.rooms.get(r.room_id).await?;
        if room.ended {
            return Err(LedgerError::RoomEnded(r.room_id).into());
        }
        let transfer_id = format!("gift:{}:{}", r.viewer_id, r.idempotency_key);
        let sub = subaccount(r.viewer_id, self.inner.subaccounts);
        let viewer = user_account(r.viewer_id);
        let transfer = Transfer {
            kind: "gift",
            debit: viewer.clone(),
            credit: room_account(r.room_id, sub),
            amount: r.amount,
            request: format!(
                "gift viewer={} room={} gift={} amount={}",
                r.viewer_id, r.room_id, r.gift_id, r.amount
            ),
            room_id: Some(r.room_id),
            report: viewer,
            debit_may_go_negative: false,
            now_ms: livemesh_mesh::now_ms(),
            transfer_id,
            // Announced to the room before the gift commits (see `Announce`).
            gift: Some(GiftNotice {
                viewer_id: r.viewer_id,
                gift_id: r.gift_id,
            }),
        };
        let applied = self.apply(r.viewer_id, &transfer).await?;
        Ok(SendGiftResponse {
            transfer_id: applied.transfer_id,
            balance: applied.balance,
        })
    }

    async fn deposit_inner(&self, r: DepositRequest) -> Result<DepositResponse, GiftError> {
        check_key(&r.idempotency_key)?;
        check_amount(r.amount, self.inner.max_transfer_amount)?;
        if r.user_id == 0 {
            return Err(GiftError::Invalid("user_id is required".into()));
        }
        let user = user_account(r.user_id);
        let transfer = Transfer {
            transfer_id: format!("deposit:{}:{}", r.user_id, r.idempotency_key),
            kind: "deposit",
            debit: EXTERNAL.to_owned(),
            credit: user.clone(),
            amount: r.amount,
            request: format!("deposit user={} amount={}", r.user_id, r.amount),
            room_id: None,
            report: user,
            debit_may_go_negative: true,
            now_ms: livemesh_mesh::now_ms(),
            gift: None,
        };
        let applied = self.apply(r.user_id, &transfer).await?;
        Ok(DepositResponse {
            transfer_id: applied.transfer_id,
            balance: applied.balance,
        })
    }
}

#[tonic::async_trait]
impl GiftsService for GiftsApi {
    async fn deposit(
        &self,
        request: Request<DepositRequest>,
    ) -> Result<Response<DepositResponse>, Status> {
        Ok(Response::new(
            self.deposit_inner(request.into_inner()).await?,
        ))
    }

    async fn send_gift(
        &self,
        request: Request<SendGiftRequest>,
    ) -> Result<Response<SendGiftResponse>, Status> {
        let (_, extensions, mut request) = request.into_parts();
        request.viewer_id = auth::viewer_id(&extensions, request.viewer_id, "viewer_id")?;
        Ok(Response::new(self.send_gift_inner(request).await?))
    }

    async fn get_balance(
        &self,
        request: Request<GetBalanceRequest>,
    ) -> Result<Response<GetBalanceResponse>, Status> {
        let (_, extensions, request) = request.into_parts();
        let user_id = auth::viewer_id(&extensions, request.user_id, "user_id")?;
        if user_id == 0 {
            return Err(GiftError::Invalid("user_id is required".into()).into());
        }
        let balance = self
            .inner
            .shard(user_id)
            .balance(&user_account(user_id))
            .await
            .map_err(GiftError::from)?;
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
        let info = self.ended_room(room_id).await?;
        let row = self
            .inner
            .settle(room_id, info.anchor_id, &|_| false)
            .await
            .map_err(|err| {
                tracing::warn!(room_id, %err, "settlement failed");
                Status::unavailable(format!(
                    "settling room {room_id} did not finish ({err}); it resumes by itself, or call SettleRoom again"
                ))
            })?;
        Ok(Response::new(SettleRoomResponse {
            settlement: Some(settlement(&row)),
        }))
    }

    async fn get_settlement(
        &self,
        request: Request<GetSettlementRequest>,
    ) -> Result<Response<GetSettlementResponse>, Status> {
        let room_id = request.into_inner().room_id;
        let info = self.room(room_id).await?;
        let row = self.inner.shards[0]
            .settlement(room_id)
            .await
            .map_err(GiftError::from)?
            .unwrap_or(SettlementRow {
                room_id,
                streamer_id: info.anchor_id,
                state: "pending".into(),
                gross: 0,
                platform_cut: 0,
                streamer_credit: 0,
                settled_at_ms: None,
            });
        Ok(Response::new(GetSettlementResponse {
            settlement: Some(settlement(&row)),
        }))
    }

    async fn reconcile(
        &self,
        request: Request<ReconcileRequest>,
    ) -> Result<Response<ReconcileResponse>, Status> {
        let room_id = request.into_inner().room_id;
        let info = self.room(room_id).await?;
        Ok(Response::new(
            self.statement(room_id, info.anchor_id)
                .await
                .map_err(GiftError::from)?,
        ))
    }

    async fn export_ledger(
        &self,
        request: Request<ExportLedgerRequest>,
    ) -> Result<Response<Self::ExportLedgerStream>, Status> {
        let request = request.into_inner();
        let from = request.from.as_ref().map_or(0, ms_from_timestamp);
        let to = request.to.as_ref().map_or(i64::MAX, ms_from_timestamp);
        if from > to {
            return Err(GiftError::Invalid("`from` is after `to`".into()).into());
        }
        let shards = self.inner.shards.clone();
        let stream = async_stream_entries(shards, from, to);
        Ok(Response::new(stream))
    }
}

/// Streams every shard's entries in `[from, to)`, shard by shard, in pages.
fn async_stream_entries(
    shards: Vec<crate::ledger::Shard>,
    from: i64,
    to: i64,
) -> BoxStream<'static, Result<ExportLedgerResponse, Status>> {
    const PAGE: i64 = 1_000;
    let state = (
        shards.into_iter(),
        None::<crate::ledger::Shard>,
        0i64,
        Vec::<EntryRow>::new(),
    );
    Box::pin(futures::stream::unfold(
        state,
        move |(mut rest, mut current, mut after, mut page)| async move {
            loop {
                if let Some(entry) = page.pop() {
                    let shard = current.as_ref().map_or(0, |s| s.index);
                    let item = ExportLedgerResponse {
                        entry: Some(LedgerEntry {
                            transfer_id: entry.transfer_id,
                            shard,
                            account: entry.account,
                            amount: entry.amount,
                            created_at: Some(timestamp_from_ms(entry.created_at_ms)),
                            kind: entry.kind,
                        }),
                    };
                    return Some((Ok(item), (rest, current, after, page)));
                }
                if current.is_none() {
                    current = Some(rest.next()?);
                    after = 0;
                }
                let shard = current.as_ref()?;
                match shard.entries(from, to, after, PAGE).await {
                    Ok(rows) if rows.is_empty() => current = None,
                    Ok(mut rows) => {
                        after = rows.last().map_or(after, |r| r.entry_id);
                        rows.reverse(); // popped from the back, in order
                        page = rows;
                    }
                    Err(err) => {
                        tracing::warn!(%err, "exporting the ledger failed");
                        let status =
                            Status::unavailable("a balance shard did not answer; export again");
                        return Some((Err(status), (Vec::new().into_iter(), None, 0, Vec::new())));
                    }
                }
            }
        },
    ))
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

/// `from` minus each of `minus`, checked: a statement's differences are
/// sums of i64 amounts and must not wrap.
fn difference(from: i64, minus: &[i64]) -> Result<i64, sqlx::Error> {
    minus
        .iter()
        .try_fold(from, |acc, m| acc.checked_sub(*m))
        .ok_or_else(|| {
            sqlx::Error::Protocol("a statement's difference does not fit a 64-bit amount".into())
        })
}

impl GiftsApi {
    async fn room(&self, room_id: u64) -> Result<livemesh_rooms::RoomInfo, GiftError> {
        if room_id == 0 {
            return Err(GiftError::Invalid("room_id is required".into()));
        }
        Ok(self.inner.rooms.get(room_id).await?)
    }

    async fn ended_room(&self, room_id: u64) -> Result<livemesh_rooms::RoomInfo, Status> {
        let info = self.room(room_id).await?;
        if !info.ended {
            return Err(Status::failed_precondition(format!(
                "room {room_id} is ongoing; it is settled when it ends"
            )));
        }
        Ok(info)
    }

    /// The finance statement of a room, per shard.
    async fn statement(
        &self,
        room_id: u64,
        anchor_id: u64,
    ) -> Result<ReconcileResponse, sqlx::Error> {
        let row = self.inner.shards[0].settlement(room_id).await?;
        let settled = row.as_ref().is_some_and(|row| row.state == "settled");
        let streamer_id = row.map_or(anchor_id, |row| row.streamer_id);
        let payer = self.inner.shard(streamer_id);
        let mut shards = Vec::new();
        for shard in &self.inner.shards {
            let s = shard.index;
            let gifts_debited = shard.room_transfers(room_id, "gift").await?;
            let virtual_credited = shard.room_credits(room_id).await?;
            let swept = shard.room_transfers(room_id, "settle-out").await?;
            let platform_cut = payer.transfer_amount(&format!("cut:{room_id}:{s}")).await?;
            let streamer_credit = payer
                .transfer_amount(&format!("settle-in:{room_id}:{s}"))
                .await?;
            let virtual_balance = shard.room_balance(room_id).await?;
            shards.push(ShardStatement {
                shard: s,
                gifts_debited,
                virtual_credited,
                settled: swept,
                platform_cut,
                streamer_credit,
                gift_difference: difference(gifts_debited, &[virtual_credited])?,
                // Credited to the room but neither still in its virtual
                // account nor paid to the streamer and the platform.
                settlement_difference: difference(
                    virtual_credited,
                    &[virtual_balance, platform_cut, streamer_credit],
                )?,
                virtual_balance,
            });
        }
        let balanced = shards.iter().all(|s| {
            s.gift_difference == 0
                && s.settlement_difference == 0
                && (!settled || s.virtual_balance == 0)
        });
        Ok(ReconcileResponse {
            room_id,
            shards,
            balanced,
        })
    }
}
