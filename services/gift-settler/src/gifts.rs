//! Gifts and deposits: the gift-settler's shared state ([`Inner`]) and the
//! transfers it applies, one local transaction in the user's shard each,
//! through the shard's group commit ([`crate::batch`]).

use std::time::Duration;

use livemesh_mesh::MeshChannel;
use livemesh_mesh::backoff::Backoff;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_rooms::{RoomDirectory, RoomInfo};

use crate::error::{GiftError, LedgerError};
use crate::store::{Applied, EXTERNAL, GiftNotice, Shard, Transfer, room_account, user_account};
use crate::{batch, shard_of};

/// The longest idempotency key a caller may send.
const MAX_KEY_BYTES: usize = 128;
/// Tries of one transfer against concurrent conflicts (deadlocks, a racing
/// request with the same key) before answering UNAVAILABLE.
const TRIES: usize = 5;

/// The gift-settler's shared state.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) shards: Vec<Shard>,
    /// Group commit of deposits and gifts, per shard.
    pub(crate) batcher: batch::Batcher,
    pub(crate) subaccounts: u32,
    /// The platform's cut of a room's gifts, in basis points.
    pub(crate) platform_cut_bps: u32,
    /// The largest amount of one deposit or gift.
    pub(crate) max_transfer_amount: i64,
    pub(crate) rooms: RoomDirectory,
    pub(crate) watch: OngoingQueryServiceClient<MeshChannel>,
}

/// A deposit to apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deposit<'a> {
    pub(crate) user_id: u64,
    pub(crate) amount: i64,
    pub(crate) idempotency_key: &'a str,
}

/// A gift to apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gift<'a> {
    pub(crate) viewer_id: u64,
    pub(crate) room_id: u64,
    pub(crate) gift_id: u64,
    pub(crate) amount: i64,
    pub(crate) idempotency_key: &'a str,
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
    u32::try_from(batch::lane(viewer_id) % u64::from(subaccounts.max(1))).unwrap_or(0)
}

impl Inner {
    /// The shard of a user.
    pub(crate) fn shard(&self, user_id: u64) -> &Shard {
        &self.shards[shard_of(user_id, self.shards.len())]
    }

    /// Applies a deposit or gift in `user_id`'s shard, in the next batch.
    async fn apply_batched(
        &self,
        user_id: u64,
        transfer: Transfer,
    ) -> Result<Applied, LedgerError> {
        self.batcher
            .apply(
                shard_of(user_id, self.shards.len()),
                batch::lane(user_id),
                transfer,
            )
            .await
    }

    /// Applies `transfer` in the user's shard, retrying conflicts at once
    /// (up to [`TRIES`] attempts), opening the room there first if it is
    /// not yet.
    async fn apply(&self, user_id: u64, transfer: &Transfer) -> Result<Applied, GiftError> {
        let shard = self.shard(user_id);
        // No delay between tries: a conflict is another batch that just
        // committed, and the caller is waiting.
        let tries = Backoff::new(
            format!("transfer {}", transfer.transfer_id),
            Duration::ZERO,
            Duration::ZERO,
        )
        .with_retries(TRIES - 1);
        let attempt = move || async move {
            let result: Result<Applied, GiftError> =
                match self.apply_batched(user_id, transfer.clone()).await {
                    Err(LedgerError::RoomNotOpen(room_id)) => {
                        // The Watch has not opened it here yet; the room was
                        // checked ongoing just before.
                        match shard
                            .open_room(room_id, self.subaccounts, livemesh_mesh::now_ms())
                            .await
                        {
                            Ok(()) => Err(LedgerError::RoomNotOpen(room_id).into()),
                            Err(err) => Err(err.into()),
                        }
                    }
                    result => result.map_err(GiftError::from),
                };
            result
        };
        let retryable = |err: &GiftError| {
            matches!(
                err,
                GiftError::Ledger(LedgerError::Conflict | LedgerError::RoomNotOpen(_))
            )
        };
        tries.retry(attempt, retryable).await
    }

    /// A gift: debits the viewer and credits the room's sub-account in the
    /// viewer's shard, announced to the room before it commits.
    pub(crate) async fn send_gift(&self, r: Gift<'_>) -> Result<Applied, GiftError> {
        check_key(r.idempotency_key)?;
        check_amount(r.amount, self.max_transfer_amount)?;
        if r.viewer_id == 0 || r.room_id == 0 {
            return Err(GiftError::Invalid(
                "viewer_id and room_id are required".into(),
            ));
        }
        let room = self.rooms.get(r.room_id).await?;
        if room.ended {
            return Err(LedgerError::RoomEnded(r.room_id).into());
        }
        let transfer_id = format!("gift:{}:{}", r.viewer_id, r.idempotency_key);
        let sub = subaccount(r.viewer_id, self.subaccounts);
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
        self.apply(r.viewer_id, &transfer).await
    }

    /// A deposit: money entering from the external funding account.
    pub(crate) async fn deposit(&self, r: Deposit<'_>) -> Result<Applied, GiftError> {
        check_key(r.idempotency_key)?;
        check_amount(r.amount, self.max_transfer_amount)?;
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
        self.apply(r.user_id, &transfer).await
    }

    /// A user's balance.
    pub(crate) async fn balance(&self, user_id: u64) -> Result<i64, GiftError> {
        if user_id == 0 {
            return Err(GiftError::Invalid("user_id is required".into()));
        }
        Ok(self.shard(user_id).balance(&user_account(user_id)).await?)
    }

    /// A room as the rooms service knows it.
    pub(crate) async fn room(&self, room_id: u64) -> Result<RoomInfo, GiftError> {
        if room_id == 0 {
            return Err(GiftError::Invalid("room_id is required".into()));
        }
        Ok(self.rooms.get(room_id).await?)
    }

    /// A room that has ended (settlement waits for the end).
    pub(crate) async fn ended_room(&self, room_id: u64) -> Result<RoomInfo, GiftError> {
        let info = self.room(room_id).await?;
        if !info.ended {
            return Err(GiftError::Ongoing(room_id));
        }
        Ok(info)
    }

    /// Opens the room's virtual accounts in every shard.
    pub(crate) async fn open_room(&self, room_id: u64) -> Result<(), sqlx::Error> {
        let now = livemesh_mesh::now_ms();
        for shard in &self.shards {
            shard.open_room(room_id, self.subaccounts, now).await?;
        }
        Ok(())
    }

    /// Stops the room taking gifts in every shard.
    pub(crate) async fn end_room(&self, room_id: u64) -> Result<(), sqlx::Error> {
        let now = livemesh_mesh::now_ms();
        for shard in &self.shards {
            shard.end_room(room_id, now).await?;
        }
        Ok(())
    }
}
