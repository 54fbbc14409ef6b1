//! The agent's command loop: it reads this host's commands from the bus (on a task of
//! its own, so a pending read is never dropped half-way), acts on `Cancel`s at once, and
//! starts `Run`s in arrival order whenever a slot is free. A `Run` is acknowledged on the
//! bus once it started (one that never started is redelivered after a restart).
//!
//! While the host drains it starts nothing: `Run`s waiting for a slot, and any that
//! arrive, are handed back — acknowledged here and left `queued` in the store, where the
//! scheduler places them again (it does so as soon as the host's status says it drains).
//! Cancels still act. Once nothing runs, it says so ([`super::Inner::drained`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::run::run_execution;
use super::Inner;
use crate::bus::{AgentCommand, BusError, DeliveryTag};
use crate::model::Resources;

/// Reads commands; `Cancel`s act at once, `Run`s wait in order for a free slot.
pub(super) async fn command_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    // The bus is read by its own task (so a pending read is never dropped half-way by a
    // `select!`), except at shutdown.
    // Commands taken but never acknowledged by a previous run of this agent come first.
    match inner.bus.requeue_unacked(&inner.cfg.id).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(agent = %inner.cfg.id, count = n, "requeued unacknowledged commands")
        }
        Err(e) => tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot requeue commands"),
    }
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<(AgentCommand, DeliveryTag)>(64);
    let reader = {
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            let mut pauses = crate::bus::retry_pauses();
            loop {
                match inner.bus.take_for_agent(&inner.cfg.id).await {
                    Ok(d) => {
                        pauses = crate::bus::retry_pauses();
                        if cmd_tx.send((d.item, d.tag)).await.is_err() {
                            return;
                        }
                    }
                    Err(BusError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(agent = %inner.cfg.id, error = %e, "reading commands");
                        let pause = pauses.next().unwrap_or(Duration::from_secs(1));
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        })
    };
    // Runs waiting for a slot, with their delivery tags (acknowledged once started: a
    // run that never started is redelivered after a restart).
    let mut waiting: VecDeque<(String, Resources, DeliveryTag)> = VecDeque::new();
    let mut executions = JoinSet::new();
    loop {
        let draining = !inner.takes_work();
        if draining {
            // Handed back: the scheduler places them on another host.
            for (id, _, tag) in waiting.drain(..) {
                hand_back(&inner, &id, &tag).await;
            }
        }
        inner
            .drained
            .send_replace(draining && executions.is_empty());
        // Start waiting runs while there are free slots.
        while !waiting.is_empty() {
            let Ok(permit) = Arc::clone(&inner.slots).try_acquire_owned() else {
                break;
            };
            let Some((id, need, tag)) = waiting.pop_front() else {
                break;
            };
            executions.spawn(run_execution(Arc::clone(&inner), id, need, permit));
            let _ = inner.bus.ack_for_agent(&inner.cfg.id, &tag).await;
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = inner.commands_wake.notified() => {}
            cmd = cmd_rx.recv() => match cmd {
                Some((AgentCommand::Run { execution_id, need }, tag)) => {
                    if waiting.iter().any(|(w, _, _)| *w == execution_id) {
                        let _ = inner.bus.ack_for_agent(&inner.cfg.id, &tag).await;
                    } else if !inner.takes_work() {
                        hand_back(&inner, &execution_id, &tag).await;
                    } else {
                        waiting.push_back((execution_id, need, tag));
                    }
                }
                Some((AgentCommand::Cancel { execution_id }, tag)) => {
                    if !inner.cancel(&execution_id) {
                        tracing::debug!(execution = %execution_id, "cancel for an execution not running here");
                    }
                    let _ = inner.bus.ack_for_agent(&inner.cfg.id, &tag).await;
                }
                None => {
                    tracing::info!(agent = %inner.cfg.id, "the bus closed; no more work");
                    break;
                }
            },
            // A slot freed up.
            Some(_) = executions.join_next(), if !executions.is_empty() => {}
        }
    }
    reader.abort();
    if !waiting.is_empty() {
        tracing::info!(agent = %inner.cfg.id, left = waiting.len(), "runs left queued at shutdown");
    }
    // Stopped before its executions ended (the bus closed, or the agent stops without
    // having drained): they are killed, and end `lost`.
    if !executions.is_empty() {
        inner.kill_all(super::LOST_ON_SHUTDOWN);
        while executions.join_next().await.is_some() {}
    }
    inner.drained.send_replace(true);
}

/// Hands a `Run` back while the host drains: acknowledged here (it is not redelivered to
/// this host), left `queued` in the store for the scheduler to place elsewhere.
async fn hand_back(inner: &Inner, id: &str, tag: &DeliveryTag) {
    tracing::info!(agent = %inner.cfg.id, execution = %id, "draining: handing a run back to the scheduler");
    let _ = inner.bus.ack_for_agent(&inner.cfg.id, tag).await;
}
