//! The forwarder: it turns the pool's events of one execution into stored and published
//! events. Output that arrives before the sandbox reported its start is held (at most
//! [`STARTED_WAIT`]) so `started` always comes first; output is handed on as whole UTF-8
//! text (a character split between two reads waits for its rest; invalid bytes are
//! carried exactly, see [`OutputData`]). Every event goes to the store first (which
//! assigns its sequence number), then to the bus — except usage samples, which are
//! live-only: published on the bus as [`LiveEvent`]s, never stored (they take no seq
//! and are not replayed; the result carries the usage summary).
//!
//! Output and progress are stored in paced batches: output that comes after a quiet
//! spell is stored at once (the first line of a run waits for no timer), while output
//! that keeps coming goes to the store at most once per [`BATCH_INTERVAL`], all that
//! arrived meanwhile (up to [`BATCH_BYTES`]) in one transaction
//! ([`crate::store::Store::append_events`]); a batch's events are then published in
//! order. A chatty run therefore costs the store a bounded number of transactions per
//! second however slow or fast its output comes. `started` heads the first batch and
//! waits at most [`STARTED_COMPANY`] for the run's next event: the first output of a
//! quick statement, which usually comes that soon, is then stored and published with it
//! in one write instead of one write later (the start latency a client sees is the
//! sandbox's own `start_ms`, which the wait does not change). A batch is published in one
//! round trip. The run flushes the batch before it finishes the execution, so nothing
//! is lost or reordered and `finished` is always last.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use hatchery_sandbox::pool::Event;

use super::run::usage_of;
use super::Inner;
use crate::model::{
    artifact_content_type, now_ms, ArtifactInfo, EventBody, ExecEvent, LiveBody, LiveEvent,
    OutputData,
};

/// How long output may wait for the sandbox's `started` report before it is forwarded
/// anyway.
pub(super) const STARTED_WAIT: Duration = Duration::from_millis(50);
/// How long `started` waits for company: the run's next event, stored with it.
pub const STARTED_COMPANY: Duration = Duration::from_millis(1);
/// Output that keeps coming is stored at most once per this interval.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(5);
/// A batch holding this many bytes of output and messages is stored at once.
pub(super) const BATCH_BYTES: usize = 64 << 10;

/// Turns the pool's events of one execution into stored and published events.
pub(super) struct Forwarder {
    inner: Arc<Inner>,
    id: String,
    /// The `started` event went out.
    pub(super) started: bool,
    /// Events that arrived before the sandbox reported its start.
    pub(super) held: Vec<Event>,
    /// Incomplete UTF-8 sequences at the end of the last chunk, per stream.
    carry: [Vec<u8>; 2],
    /// Events waiting to be stored together, and their size.
    batch: Vec<EventBody>,
    batch_bytes: usize,
    /// When the last batch went to the store.
    last_flush: Option<Instant>,
    /// Until when a batch holding only `started` waits for the run's next event.
    started_due: Option<Instant>,
    /// The artifacts stored so far, for the result.
    pub(super) artifacts: Vec<ArtifactInfo>,
}

/// Publishes stored events on the bus, in order, in one round trip. In place: a task of
/// its own would cost a wake-up more on the way to the client (the bus client has its
/// own), and the next store write of a quick run is its end anyway.
async fn publish(inner: &Inner, id: &str, events: Vec<ExecEvent>) {
    let began = std::time::Instant::now();
    let n = events.len();
    if let Err(e) = inner.bus.publish_events(events).await {
        tracing::warn!(execution = id, events = n, error = %e, "cannot publish events");
    }
    tracing::trace!(
        execution = id,
        events = n,
        ms = began.elapsed().as_secs_f64() * 1e3,
        "published"
    );
}

impl Forwarder {
    pub(super) fn new(inner: Arc<Inner>, id: String) -> Forwarder {
        Forwarder {
            started: false,
            held: Vec::new(),
            carry: [Vec::new(), Vec::new()],
            batch: Vec::new(),
            batch_bytes: 0,
            last_flush: None,
            started_due: None,
            artifacts: Vec::new(),
            inner,
            id,
        }
    }

    /// When the waiting batch is to be stored, if one waits: `started` alone when its
    /// company is due ([`STARTED_COMPANY`]), else at once after a quiet spell, else
    /// [`BATCH_INTERVAL`] after the last batch.
    pub(super) fn flush_due(&self) -> Option<Instant> {
        if self.batch.is_empty() {
            return None;
        }
        if let Some(due) = self.started_due {
            return Some(due);
        }
        let now = Instant::now();
        Some(
            self.last_flush
                .map_or(now, |t| (t + BATCH_INTERVAL).max(now)),
        )
    }

    /// Queues `started` (once) at the head of a batch, then whatever was held back for
    /// it; with nothing held, the batch waits for company until [`STARTED_COMPANY`].
    pub(super) async fn start(&mut self, start_ms: Option<f64>) {
        if self.started {
            return;
        }
        self.started = true;
        let agent = self.inner.cfg.id.clone();
        self.queue(EventBody::Started { agent, start_ms }).await;
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            self.started_due = Some(Instant::now() + STARTED_COMPANY);
        }
        for event in held {
            self.send(event).await;
        }
    }

    pub(super) async fn forward(&mut self, event: Event) {
        if self.started {
            self.send(event).await;
        } else {
            self.held.push(event);
        }
    }

    async fn send(&mut self, event: Event) {
        let body = match event {
            Event::Stdout { data } => match decode_chunk(&mut self.carry[0], &data) {
                Some(bytes) => EventBody::Stdout(OutputData::from_bytes(bytes)),
                None => return,
            },
            Event::Stderr { data } => match decode_chunk(&mut self.carry[1], &data) {
                Some(bytes) => EventBody::Stderr(OutputData::from_bytes(bytes)),
                None => return,
            },
            Event::Progress { fraction, message } => EventBody::Progress { fraction, message },
            Event::Usage(u) => {
                let usage = usage_of(&u);
                if let Some(r) = self.inner.running.lock().unwrap().get_mut(&self.id) {
                    r.usage = usage.clone();
                }
                self.publish_live(LiveBody::Usage(usage)).await;
                return;
            }
            Event::Artifact { name, data } => match self.store_artifact(name, data).await {
                Some(info) => EventBody::Artifact(info),
                None => return,
            },
            Event::Started { .. } | Event::Finished(_) => return,
        };
        self.queue(body).await;
    }

    /// Stores an artifact (sealed, like every object) under [`ArtifactInfo::key`]; its
    /// event is queued only once it is stored, so a client never sees one it cannot
    /// download. One that cannot be stored is left out and said so on stderr.
    async fn store_artifact(&mut self, name: String, data: Vec<u8>) -> Option<ArtifactInfo> {
        let info = ArtifactInfo {
            bytes: data.len() as u64,
            content_type: artifact_content_type(&name).to_string(),
            name,
        };
        let key = ArtifactInfo::key(&self.id, &info.name);
        match self.inner.objects.put(&key, data).await {
            Ok(()) => {
                self.artifacts.push(info.clone());
                Some(info)
            }
            Err(e) => {
                tracing::warn!(execution = %self.id, artifact = %info.name, error = %e, "cannot store an artifact");
                let note = format!("hatchery: the artifact {} could not be stored\n", info.name);
                self.queue(EventBody::Stderr(OutputData::from_bytes(note.into_bytes())))
                    .await;
                None
            }
        }
    }

    /// Emits what is left of incomplete UTF-8 sequences (exactly, see [`OutputData`]).
    pub(super) async fn flush_text(&mut self) {
        let carry = std::mem::take(&mut self.carry);
        for (i, carry) in carry.into_iter().enumerate() {
            if carry.is_empty() {
                continue;
            }
            let data = OutputData::from_bytes(carry);
            let body = if i == 0 {
                EventBody::Stdout(data)
            } else {
                EventBody::Stderr(data)
            };
            self.queue(body).await;
        }
    }

    /// Publishes a live-only event (not stored: no seq, not replayed).
    async fn publish_live(&self, body: LiveBody) {
        let event = LiveEvent {
            execution_id: self.id.clone(),
            at: now_ms(),
            body,
        };
        if let Err(e) = self.inner.bus.publish_live(event).await {
            tracing::debug!(execution = %self.id, error = %e, "cannot publish a live event");
        }
    }

    /// Adds an event to the batch; stores the batch once it is large enough.
    async fn queue(&mut self, body: EventBody) {
        // Company for `started`: the batch is due by the usual rule now.
        self.started_due = None;
        self.batch_bytes += size_of(&body);
        self.batch.push(body);
        if self.batch_bytes >= BATCH_BYTES {
            self.flush().await;
        }
    }

    /// Stores the waiting batch in one transaction, then publishes its events in order.
    pub(super) async fn flush(&mut self) {
        self.batch_bytes = 0;
        self.started_due = None;
        let bodies = std::mem::take(&mut self.batch);
        if bodies.is_empty() {
            return;
        }
        self.last_flush = Some(Instant::now());
        let id = self.id.as_str();
        let n = bodies.len();
        let stored = self
            .inner
            .store_write("its output", id, || {
                self.inner.store.append_events(id, bodies.clone())
            })
            .await;
        match stored {
            Ok(events) => publish(&self.inner, id, events).await,
            Err(e) => tracing::warn!(execution = id, events = n, error = %e, "cannot store events"),
        }
    }
}

/// What an event adds to a batch: the bytes of its output or message.
fn size_of(body: &EventBody) -> usize {
    match body {
        EventBody::Stdout(d) | EventBody::Stderr(d) => {
            d.data.len() + d.data_base64.as_ref().map_or(0, String::len)
        }
        EventBody::Progress { message, .. } => message.len(),
        _ => 0,
    }
}

/// The bytes of `data` after the carried ones, up to an incomplete UTF-8 sequence at the
/// end, which is kept for the next chunk (so a character split between two reads stays
/// whole). `None` when nothing is complete yet.
fn decode_chunk(carry: &mut Vec<u8>, data: &[u8]) -> Option<Vec<u8>> {
    carry.extend_from_slice(data);
    let keep = incomplete_tail(carry);
    let tail = carry.split_off(carry.len() - keep);
    let bytes = std::mem::replace(carry, tail);
    (!bytes.is_empty()).then_some(bytes)
}

/// How many bytes at the end of `b` start a UTF-8 sequence that is not complete yet.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let start = b.len() - back;
        let byte = b[start];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let need = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        let prefix_ok =
            matches!(std::str::from_utf8(&b[start..]), Err(e) if e.error_len().is_none());
        return if need > back && prefix_ok { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let text = "größe €";
        let bytes = text.as_bytes();
        let mut carry = Vec::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(1) {
            if let Some(s) = decode_chunk(&mut carry, chunk) {
                // Every piece handed on is whole text.
                assert!(std::str::from_utf8(&s).is_ok(), "{s:?}");
                out.extend_from_slice(&s);
            }
        }
        assert!(carry.is_empty());
        assert_eq!(out, bytes);
    }

    #[test]
    fn invalid_utf8_is_carried_exactly_not_held() {
        let mut carry = Vec::new();
        let piece = decode_chunk(&mut carry, b"a\xffb").unwrap();
        assert!(carry.is_empty());
        let data = OutputData::from_bytes(piece);
        assert_eq!(data.data, "a\u{fffd}b");
        assert_eq!(data.bytes(), b"a\xffb");
        // A lone continuation byte at the end is invalid, not incomplete.
        assert_eq!(
            decode_chunk(&mut carry, b"x\x80").as_deref(),
            Some(&b"x\x80"[..])
        );
        // An incomplete 3-byte sequence waits.
        assert_eq!(
            decode_chunk(&mut carry, b"y\xe2\x82").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(carry, b"\xe2\x82");
        assert_eq!(
            decode_chunk(&mut carry, b"\xac").as_deref(),
            Some("€".as_bytes())
        );
        // Valid text has no base64 copy.
        assert_eq!(OutputData::from_bytes(b"ok".to_vec()).data_base64, None);
    }
}
