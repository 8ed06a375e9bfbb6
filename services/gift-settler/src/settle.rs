//! The Settler: at room end, every shard's virtual account goes to the
//! streamer, minus the platform's cut, exactly once.
//!
//! Per room, in order (each step idempotent, each transfer id derived from
//! the room and the shard, so a crash anywhere followed by a retry pays
//! exactly once):
//!
//! 1. `Begin`: the coordinating shard (shard 0) records the settlement as
//!    `in_progress`; a restarted settler resumes every such room.
//! 2. `EndShard(s)`: shard `s` stops taking the room's gifts (waiting for
//!    those in flight).
//! 3. `SweepShard(s)`: each of the room's sub-accounts in shard `s` moves its
//!    whole balance to the clearing account there (`settle-out:<room>:<s>:<k>`).
//! 4. `PayShard(s)`: in the streamer's shard, the clearing account pays what
//!    shard `s` swept: the cut to the platform (`cut:<room>:<s>`), the rest
//!    to the streamer (`settle-in:<room>:<s>`). The amount is read back from
//!    shard `s`'s committed sweep transfers, so a retry pays the same.
//! 5. `Finish`: the coordinating shard records the totals as `settled`.
//!
//! **Invariant:** the clearing account sums to zero over all shards once a
//! room is settled (every sweep has its payment), so settlement neither
//! creates nor loses money.

use crate::error::SettleError;
use crate::gifts::Inner;
use crate::store::{CLEARING, PLATFORM, SettlementRow, Transfer, user_account};

/// A step of a settlement, for crash injection in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Begin,
    EndShard(u32),
    SweepShard(u32),
    PayShard(u32),
    Finish,
}

/// The platform's share of `amount` at `bps` basis points, rounded down
/// (the streamer gets the remainder).
pub fn cut_of(amount: i64, bps: u32) -> i64 {
    let cut = i128::from(amount) * i128::from(bps.min(10_000)) / 10_000;
    i64::try_from(cut).unwrap_or(0)
}

impl Inner {
    /// Settles an ended room (see the module doc); `crash` is asked before
    /// each step and stops there when it says so (tests inject crashes).
    #[tracing::instrument(name = "settle", skip_all, fields(room_id = room_id, streamer_id = streamer_id))]
    pub(crate) async fn settle(
        &self,
        room_id: u64,
        streamer_id: u64,
        crash: &(dyn Fn(Step) -> bool + Sync),
    ) -> Result<SettlementRow, SettleError> {
        let now = livemesh_mesh::now_ms;
        let check = |step: Step| {
            if crash(step) {
                Err(SettleError::Crash(step))
            } else {
                Ok(())
            }
        };
        let coordinator = &self.shards[0];
        if let Some(row) = coordinator.settlement(room_id).await?
            && row.state == "settled"
        {
            return Ok(row);
        }
        check(Step::Begin)?;
        coordinator
            .begin_settlement(room_id, streamer_id, now())
            .await?;
        // The streamer recorded first is the one paid, whoever retries.
        let streamer_id = coordinator
            .settlement(room_id)
            .await?
            .map_or(streamer_id, |row| row.streamer_id);
        let payer = self.shard(streamer_id);
        let (mut gross, mut cut_total, mut credit_total) = (0i64, 0i64, 0i64);
        for shard in &self.shards {
            let s = shard.index;
            check(Step::EndShard(s))?;
            shard.end_room(room_id, now()).await?;
            check(Step::SweepShard(s))?;
            for sub in 0..self.subaccounts {
                shard
                    .sweep(
                        room_id,
                        sub,
                        &format!("settle-out:{room_id}:{s}:{sub}"),
                        now(),
                    )
                    .await?;
            }
            let swept = shard.room_transfers(room_id, "settle-out").await?;
            check(Step::PayShard(s))?;
            let cut = cut_of(swept, self.platform_cut_bps);
            let credit = swept - cut;
            let pay = |transfer_id: String,
                       credit_account: String,
                       amount: i64,
                       kind: &'static str| Transfer {
                request: format!("{kind} room={room_id} shard={s} amount={amount}"),
                transfer_id,
                kind,
                debit: CLEARING.to_owned(),
                report: credit_account.clone(),
                credit: credit_account,
                amount,
                room_id: None,
                debit_may_go_negative: true,
                now_ms: now(),
                gift: None,
            };
            if cut > 0 {
                payer
                    .apply(&pay(
                        format!("cut:{room_id}:{s}"),
                        PLATFORM.to_owned(),
                        cut,
                        "cut",
                    ))
                    .await?;
            }
            if credit > 0 {
                payer
                    .apply(&pay(
                        format!("settle-in:{room_id}:{s}"),
                        user_account(streamer_id),
                        credit,
                        "settle-in",
                    ))
                    .await?;
            }
            let overflow = || SettleError::Overflow(room_id);
            gross = gross.checked_add(swept).ok_or_else(overflow)?;
            cut_total = cut_total.checked_add(cut).ok_or_else(overflow)?;
            credit_total = credit_total.checked_add(credit).ok_or_else(overflow)?;
        }
        check(Step::Finish)?;
        coordinator
            .finish_settlement(room_id, gross, cut_total, credit_total, now())
            .await?;
        coordinator
            .settlement(room_id)
            .await?
            .ok_or(SettleError::Crash(Step::Finish))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_rounds_down_and_never_exceeds_the_amount() {
        assert_eq!(cut_of(1_000, 3_000), 300);
        assert_eq!(cut_of(999, 3_000), 299);
        assert_eq!(cut_of(7, 0), 0);
        assert_eq!(cut_of(7, 20_000), 7);
        assert_eq!(cut_of(i64::MAX, 10_000), i64::MAX);
    }
}
