//! Group commit: transfers to one shard that arrive together are applied
//! in one transaction ([`Shard::apply_batch`]), so a hot room's gifts share
//! one commit (one log flush) instead of paying one each.
//!
//! Each shard has `workers` queues; a transfer goes to the queue of its
//! user's lane (a hash of the user), and a gift credits the room
//! sub-account of that lane, so two batches in flight at once touch neither
//! the same user's row nor the same sub-account (they would queue on the
//! row locks). A worker
//! takes whatever is waiting, up to `max_batch`, applies it, answers every
//! caller, and goes on; under no load a batch is one transfer.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::LedgerError;
use crate::store::{Announce, Applied, Shard, Transfer};

type Reply = oneshot::Sender<Result<Applied, LedgerError>>;

/// The queues of every shard.
#[derive(Debug)]
pub struct Batcher {
    /// `queues[shard][worker]`.
    queues: Vec<Vec<mpsc::Sender<(Transfer, Reply)>>>,
}

/// How many transfers wait per queue before callers wait for room.
const QUEUE: usize = 4_096;

impl Batcher {
    /// Starts `workers` batch workers per shard (tokio tasks that end when
    /// the batcher is dropped); gifts are announced through `announce`
    /// before their batch commits.
    pub fn start(
        shards: &[Shard],
        workers: usize,
        max_batch: usize,
        announce: Arc<dyn Announce>,
    ) -> Self {
        let queues = shards
            .iter()
            .map(|shard| {
                (0..workers.max(1))
                    .map(|_| {
                        let (tx, rx) = mpsc::channel(QUEUE);
                        tokio::spawn(work(shard.clone(), rx, max_batch.max(1), announce.clone()));
                        tx
                    })
                    .collect()
            })
            .collect();
        Self { queues }
    }

    /// Applies `transfer` in shard `shard` as part of the next batch of
    /// the worker of `lane`.
    pub async fn apply(
        &self,
        shard: usize,
        lane: u64,
        transfer: Transfer,
    ) -> Result<Applied, LedgerError> {
        let queues = &self.queues[shard];
        // The remainder is below the number of workers, a usize.
        let worker = usize::try_from(lane % queues.len() as u64).unwrap_or(0);
        let (reply, answer) = oneshot::channel();
        if queues[worker].send((transfer, reply)).await.is_err() {
            return Err(LedgerError::Conflict); // the worker is gone (shutting down)
        }
        answer.await.unwrap_or(Err(LedgerError::Conflict))
    }
}

async fn work(
    shard: Shard,
    mut queue: mpsc::Receiver<(Transfer, Reply)>,
    max_batch: usize,
    announce: Arc<dyn Announce>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut batch, max_batch).await > 0 {
        // Every batch takes its debit rows' locks in one order, so two
        // batches in flight never wait on each other in a cycle. The sort
        // is stable: one account's transfers keep their order.
        batch.sort_by(|(a, _), (b, _)| a.debit.cmp(&b.debit));
        let (transfers, replies): (Vec<Transfer>, Vec<Reply>) = batch.drain(..).unzip();
        match shard.apply_batch(&transfers, announce.as_ref()).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(LedgerError::Unavailable(open)) => {
                // Not attempted: the shard's breaker is open.
                for reply in replies {
                    let _ = reply.send(Err(LedgerError::Unavailable(open.clone())));
                }
            }
            Err(err) if err.is_permanent() && transfers.len() > 1 => {
                // The database refused the whole batch for one of its
                // transfers (a constraint): each goes again alone, so only
                // that one is refused and the rest are applied.
                tracing::warn!(shard = shard.index, %err, transfers = transfers.len(),
                    "a gift batch was refused; applying its transfers one by one");
                for (transfer, reply) in transfers.iter().zip(replies) {
                    let result = match shard
                        .apply_batch(std::slice::from_ref(transfer), announce.as_ref())
                        .await
                    {
                        Ok(mut results) => results.pop().unwrap_or(Err(LedgerError::Conflict)),
                        Err(err) => Err(refusal(&shard, transfer, err)),
                    };
                    let _ = reply.send(result);
                }
            }
            Err(err) if err.is_permanent() => {
                // A batch of one transfer, refused for good.
                if let (Some(transfer), Some(reply)) =
                    (transfers.first(), replies.into_iter().next())
                {
                    let _ = reply.send(Err(refusal(&shard, transfer, err)));
                }
            }
            Err(err) => {
                // Nothing of the batch was applied and the cause passes
                // (a conflict, a lost connection): every caller retries.
                tracing::debug!(shard = shard.index, %err, "a gift batch failed");
                for reply in replies {
                    let _ = reply.send(Err(LedgerError::Conflict));
                }
            }
        }
    }
}

/// Logs a transfer the database refused (at warn: the ledger's checks
/// should have caught it first) and passes the refusal on.
fn refusal(shard: &Shard, transfer: &Transfer, err: LedgerError) -> LedgerError {
    if err.is_permanent() {
        tracing::warn!(shard = shard.index, transfer_id = %transfer.transfer_id, %err,
            "the balance database refused a transfer");
    }
    err
}

/// A user's lane: a stable hash (FNV-1a) of the user id. Deposits and gifts
/// of one user take the same batch worker, and a gift credits the room
/// sub-account `lane % subaccounts`.
pub fn lane(user_id: u64) -> u64 {
    livemesh_mesh::fnv1a(&user_id.to_le_bytes())
}
