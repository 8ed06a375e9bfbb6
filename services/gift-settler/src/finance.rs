//! What finance reads: a room's settlement, its per-shard statement (whose
//! differences must be zero) and the ledger's entries.

use futures::stream::BoxStream;
use livemesh_proto::v1::{ReconcileResponse, ShardStatement};

use crate::error::GiftError;
use crate::gifts::Inner;
use crate::store::{EntryRow, SettlementRow, Shard};

/// Entries read from a shard per query of the export.
const PAGE: i64 = 1_000;

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

impl Inner {
    /// The room's settlement record; `pending` (nothing paid yet) before
    /// its settlement began.
    pub(crate) async fn settlement(&self, room_id: u64) -> Result<SettlementRow, GiftError> {
        let info = self.room(room_id).await?;
        Ok(self.shards[0]
            .settlement(room_id)
            .await?
            .unwrap_or(SettlementRow {
                room_id,
                streamer_id: info.anchor_id,
                state: "pending".into(),
                gross: 0,
                platform_cut: 0,
                streamer_credit: 0,
                settled_at_ms: None,
            }))
    }

    /// The finance statement of a room, per shard.
    pub(crate) async fn statement(&self, room_id: u64) -> Result<ReconcileResponse, GiftError> {
        let info = self.room(room_id).await?;
        Ok(self.shard_statements(room_id, info.anchor_id).await?)
    }

    async fn shard_statements(
        &self,
        room_id: u64,
        anchor_id: u64,
    ) -> Result<ReconcileResponse, sqlx::Error> {
        let row = self.shards[0].settlement(room_id).await?;
        let settled = row.as_ref().is_some_and(|row| row.state == "settled");
        let streamer_id = row.map_or(anchor_id, |row| row.streamer_id);
        let payer = self.shard(streamer_id);
        let mut shards = Vec::new();
        for shard in &self.shards {
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

    /// Every shard's entries with `from <= created_at_ms < to`, shard by
    /// shard, in pages, each with its shard's index; a failing shard ends
    /// the stream with its error.
    pub(crate) fn entries(
        &self,
        from: i64,
        to: i64,
    ) -> Result<BoxStream<'static, Result<(u32, EntryRow), GiftError>>, GiftError> {
        if from > to {
            return Err(GiftError::Invalid("`from` is after `to`".into()));
        }
        Ok(entries_of(self.shards.clone(), from, to))
    }
}

/// Streams `shards`' entries in `[from, to)`, shard by shard, in pages.
fn entries_of(
    shards: Vec<Shard>,
    from: i64,
    to: i64,
) -> BoxStream<'static, Result<(u32, EntryRow), GiftError>> {
    let state = (
        shards.into_iter(),
        None::<Shard>,
        0i64,
        Vec::<EntryRow>::new(),
    );
    Box::pin(futures::stream::unfold(
        state,
        move |(mut rest, mut current, mut after, mut page)| async move {
            loop {
                if let Some(entry) = page.pop() {
                    let shard = current.as_ref().map_or(0, |s| s.index);
                    return Some((Ok((shard, entry)), (rest, current, after, page)));
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
                        let end = (Vec::new().into_iter(), None, 0, Vec::new());
                        return Some((Err(GiftError::Export(err)), end));
                    }
                }
            }
        },
    ))
}
