//! Publishing claimed rows with many PubAcks in flight.
//!
//! The acks do not go through the JetStream context: per message it makes a reply inbox, an ack channel, a
//! permit, a boxed future and a timer, about a third of the relay's CPU per row. The relay instead sends every
//! row with a reply subject under one subscription of its own, `<inbox>.<wave>.<row>`, and reads the PubAcks
//! there, with one deadline for the whole wave.
//!
//! What rows of one event name share (the subject, the `qx.event_name` value, both checked) is made once per
//! batch, and what a wave's reply subjects share once per wave.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use async_nats::header::HeaderValue;
use async_nats::jetstream::context::{AccountErrorKind, GetStreamByNameErrorKind};
use async_nats::jetstream::{stream, ErrorCode};
use async_nats::{Message, Subject, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::outcome::{read_ack, Ack, Failure, FailureKind, Outcome, StoredAt};
use super::RelayPublisher;
use crate::envelope::event_id_of;
use crate::relay::store::OutboxRow;
use crate::wire;

/// The subscription every PubAck of this relay arrives on.
#[derive(Debug)]
pub(super) struct AckInbox {
    /// `<inbox>.`; a reply subject adds `<wave>.<row index>`.
    prefix: String,
    subscriber: Subscriber,
    /// Numbers the waves, so a late ack of an abandoned wave is not taken for a row of the current one.
    wave: u64,
    /// `<inbox>.<wave>.` of the current wave.
    wave_prefix: String,
}

impl AckInbox {
    async fn open(client: &async_nats::Client) -> Result<Self, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let subscriber = client.subscribe(format!("{inbox}.>")).await?;
        Ok(Self { prefix: format!("{inbox}."), subscriber, wave: 0, wave_prefix: String::new() })
    }

    /// Starts the next wave: acks of earlier ones no longer count.
    fn next_wave(&mut self) {
        self.wave += 1;
        self.wave_prefix = format!("{}{}.", self.prefix, self.wave);
    }

    fn reply_subject(&self, index: usize) -> Subject {
        let mut subject = String::with_capacity(self.wave_prefix.len() + 20);
        subject.push_str(&self.wave_prefix);
        let _ = write!(subject, "{index}");
        subject.into()
    }

    /// The row index an ack of the current wave answers.
    fn row_of(&self, ack: &Message) -> Option<usize> {
        row_answered(&self.wave_prefix, &ack.subject)
    }
}

/// The row index in `reply_subject` when it is `<wave_prefix><row>`.
fn row_answered(wave_prefix: &str, reply_subject: &str) -> Option<usize> {
    reply_subject.strip_prefix(wave_prefix)?.parse().ok()
}

/// What the rows of one event name share: the subject and the `qx.event_name` value, checked once.
#[derive(Debug)]
struct EventName {
    subject: Subject,
    header: HeaderValue,
}

/// The [`EventName`]s of one batch, made as rows need them.
type EventNames<'a> = HashMap<&'a str, Result<EventName, Failure>>;

impl RelayPublisher {
    /// Publishes `rows` in claim order, keeping up to `max_in_flight` acks (and `max_batch_bytes` of bodies)
    /// pending.
    ///
    /// Rows sharing an order key go out in waves: a row is sent only after the previous row of its key was
    /// acknowledged, and not at all once that one failed. With the default key (the row id) every row is its
    /// own key, so the whole batch is one pipelined wave.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping it abandons acks, and their rows are then sent again (dedupe absorbs that).
    pub async fn publish_batch(&self, rows: &[OutboxRow]) -> Vec<Outcome> {
        let mut acks = self.acks.lock().await;
        let inbox = match acks.as_mut() {
            Some(inbox) => inbox,
            None => match AckInbox::open(&self.client).await {
                Ok(inbox) => acks.insert(inbox),
                Err(err) => return vec![Outcome::Failed(Failure::no_ack_inbox(&err)); rows.len()],
            },
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; rows.len()];
        let mut duplicates = Vec::new();
        let mut remaining: Vec<usize> = (0..rows.len()).collect();
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut names = EventNames::new();
        while !remaining.is_empty() {
            let mut wave = Vec::with_capacity(remaining.len());
            let mut later = Vec::new();
            let mut keys_in_wave: HashSet<&str> = HashSet::new();
            for index in remaining {
                match rows[index].order_key.as_deref() {
                    None => wave.push(index),
                    Some(key) if failed_keys.contains(key) => outcomes[index] = Some(Outcome::Deferred),
                    Some(key) if !keys_in_wave.insert(key) => later.push(index),
                    Some(_) => wave.push(index),
                }
            }
            if !self.publish_wave(inbox, rows, &wave, &mut names, &mut outcomes, &mut duplicates).await {
                *acks = None; // the subscription ended: open a new one for the next batch
                break;
            }
            for &index in &wave {
                if let (Some(key), Some(Outcome::Failed(_))) =
                    (rows[index].order_key.as_deref(), &outcomes[index])
                {
                    failed_keys.insert(key);
                }
            }
            remaining = later;
        }
        drop(acks);
        let mut outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Failed(Failure::unanswered())))
            .collect();
        for index in self.clashes(rows, duplicates).await {
            outcomes[index] = Outcome::IdTaken;
        }
        // "No responders" says only that nobody answered for the subject: the stream is missing only if
        // JetStream says so.
        let no_stream = |o: &Outcome| matches!(o, Outcome::Failed(f) if f.kind == FailureKind::NoStream);
        let mut verdicts: HashMap<&str, Option<Failure>> = HashMap::new();
        for (index, outcome) in outcomes.iter_mut().enumerate() {
            if !no_stream(outcome) {
                continue;
            }
            let Some(Ok(name)) = names.get(rows[index].event_name.as_str()) else { continue };
            let verdict = match verdicts.entry(name.subject.as_str()) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let verdict = self.why_unanswered(entry.key()).await;
                    entry.insert(verdict)
                }
            };
            if let Some(failure) = verdict {
                *outcome = Outcome::Failed(failure.clone());
            }
        }
        // A batch of which some rows went unanswered says NATS is not taking messages, even if others got in.
        let unavailable = |o: &Outcome| matches!(o, Outcome::Failed(f) if f.kind == FailureKind::Unavailable);
        if outcomes.iter().any(unavailable) {
            self.storing.store(false, Ordering::Relaxed);
        } else if outcomes.iter().any(|o| matches!(o, Outcome::Published { .. })) {
            self.storing.store(true, Ordering::Relaxed);
        }
        outcomes
    }

    /// Sends `wave` with up to `max_in_flight` acks pending and records each row's outcome, and where the
    /// stream holds the rows it called duplicates. When neither a send nor an ack has gone through for
    /// `ack_timeout`, every row still waiting or not sent yet timed out: a dead connection costs one
    /// `ack_timeout` per wave, not one per message. False when the subscription ended.
    async fn publish_wave<'a>(
        &self,
        inbox: &mut AckInbox,
        rows: &'a [OutboxRow],
        wave: &[usize],
        names: &mut EventNames<'a>,
        outcomes: &mut [Option<Outcome>],
        duplicates: &mut Vec<(usize, StoredAt)>,
    ) -> bool {
        inbox.next_wave();
        let mut awaiting = vec![false; rows.len()];
        let (mut in_flight, mut in_flight_bytes) = (0, 0);
        let mut to_send = wave.iter().copied().peekable();
        let mut progress_at = Instant::now();
        let timed_out = loop {
            let room = |next: usize| {
                in_flight == 0
                    || (in_flight < self.max_in_flight
                        && in_flight_bytes + rows[next].payload.len() <= self.max_in_flight_bytes)
            };
            if let Some(index) = to_send.next_if(|&next| room(next)) {
                let row = &rows[index];
                let name = names.entry(&row.event_name).or_insert_with(|| self.event_name(&row.event_name));
                let sent = tokio::time::timeout_at(
                    progress_at + self.ack_timeout,
                    self.send(inbox, index, row, name),
                );
                match sent.await {
                    Ok(Ok(())) => {
                        awaiting[index] = true;
                        in_flight += 1;
                        in_flight_bytes += rows[index].payload.len();
                        progress_at = Instant::now();
                    }
                    Ok(Err(failure)) => outcomes[index] = Some(Outcome::Failed(failure)),
                    Err(_) => {
                        outcomes[index] = Some(Outcome::Failed(Failure::timed_out()));
                        break true;
                    }
                }
                continue;
            }
            if in_flight == 0 {
                break false;
            }
            let ack = match tokio::time::timeout_at(progress_at + self.ack_timeout, inbox.subscriber.next())
                .await
            {
                Ok(Some(ack)) => ack,
                Ok(None) => return false,
                Err(_) => break true,
            };
            let Some(index) = inbox.row_of(&ack).filter(|&index| awaiting.get(index) == Some(&true)) else {
                continue;
            };
            awaiting[index] = false;
            in_flight -= 1;
            in_flight_bytes -= rows[index].payload.len();
            progress_at = Instant::now();
            outcomes[index] = Some(match read_ack(&ack, || self.is_connected()) {
                Ack::Stored => Outcome::Published { duplicate: false },
                Ack::Duplicate(at) => {
                    duplicates.push((index, at));
                    Outcome::Published { duplicate: true }
                }
                Ack::Failed(failure) => Outcome::Failed(failure),
            });
        };
        if timed_out {
            for index in to_send.chain(wave.iter().copied().filter(|&index| awaiting[index])) {
                outcomes[index] = Some(Outcome::Failed(Failure::timed_out()));
            }
        }
        true
    }

    /// The subject and `qx.event_name` value of `event_name`, or why it has none.
    fn event_name(&self, event_name: &str) -> Result<EventName, Failure> {
        let subject =
            wire::subject(&self.subject_prefix, event_name).map_err(|err| Failure::invalid_subject(&err))?;
        Ok(EventName { subject: subject.into(), header: HeaderValue::from(event_name) })
    }

    /// Sends row `index` with its reply subject; the ack arrives in `inbox`.
    async fn send(
        &self,
        inbox: &AckInbox,
        index: usize,
        row: &OutboxRow,
        name: &Result<EventName, Failure>,
    ) -> Result<(), Failure> {
        let EventName { subject, header } = name.as_ref().map_err(Clone::clone)?;
        let event_id = event_id_of(&row.payload);
        // The envelope's event_id identifies the event across retries and relays; the row id is the fallback.
        let msg_id = event_id.unwrap_or(row.id);
        let headers = wire::header_map(
            header.clone(),
            row.event_version,
            event_id,
            row.correlation_id,
            row.tenant_id,
            msg_id,
        );
        self.client
            .publish_with_reply_and_headers(
                subject.clone(),
                inbox.reply_subject(index),
                headers,
                Bytes::copy_from_slice(row.payload.as_bytes()),
            )
            .await
            .map_err(|err| Failure::not_sent(&err))
    }

    /// Rows of `duplicates` (row index, and where the stream holds the message it took them for) whose
    /// stored message has other content. Only duplicates are looked at, each with one request: they are rare
    /// (a republish after a crash, or two rows sharing an event_id). All of it within one `ack_timeout`, so a
    /// batch of repeats on a slow server costs one wait, not one per row; the rows not looked at by then stay
    /// plain duplicates (their event is in the stream either way).
    async fn clashes(&self, rows: &[OutboxRow], duplicates: Vec<(usize, StoredAt)>) -> Vec<usize> {
        let deadline = Instant::now() + self.ack_timeout;
        let mut clashes = Vec::new();
        let mut streams: HashMap<String, Option<stream::Stream>> = HashMap::new();
        for (index, at) in duplicates {
            let stream = match streams.entry(at.stream) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let found =
                        tokio::time::timeout_at(deadline, self.jetstream.get_stream(entry.key())).await;
                    entry.insert(found.ok().and_then(Result::ok))
                }
            };
            let Some(stream) = stream else { continue };
            // A message gone since (limits, purge) proves nothing either way.
            match tokio::time::timeout_at(deadline, stream.get_raw_message(at.seq)).await {
                Ok(Ok(stored)) if stored.payload != rows[index].payload.as_bytes() => clashes.push(index),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        clashes
    }

    /// After publishes to `subject` nobody answered: `None` when JetStream answers that no stream captures
    /// it; otherwise the outage it is: JetStream missing on the server (disabled, or still starting) or not
    /// answering, or a stream that captures the subject but has no leader (an election, a lost quorum).
    async fn why_unanswered(&self, subject: &str) -> Option<Failure> {
        // Both requests are bounded by the context's timeout, ack_timeout.
        match self.jetstream.query_account().await.map_err(|err| err.kind()) {
            Err(AccountErrorKind::JetStreamUnavailable) => {
                return Some(Failure::unanswered_by_jetstream(
                    "JetStream is not running on the server (not enabled, or still starting)",
                ));
            }
            Err(AccountErrorKind::JetStream(err))
                if [ErrorCode::JETSTREAM_NOT_ENABLED, ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT]
                    .contains(&err.error_code()) =>
            {
                return Some(Failure::unanswered_by_jetstream("JetStream is not enabled for this account"));
            }
            _ => {}
        }
        match self.jetstream.stream_by_subject(subject).await {
            Err(err) if err.kind() == GetStreamByNameErrorKind::NotFound => None,
            Ok(stream) => Some(Failure::unanswered_by_jetstream(format!(
                "stream {stream} captures the subject but did not answer: it has no leader (an election, or its \
                 quorum lost)"
            ))),
            Err(err) => Some(Failure::unanswered_by_jetstream(format!(
                "JetStream did not answer which stream captures the subject: {err}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_matched_to_rows_of_the_current_wave_only() {
        let prefix = "_INBOX.abc.3.";
        assert_eq!(row_answered(prefix, "_INBOX.abc.3.17"), Some(17));
        assert_eq!(row_answered(prefix, "_INBOX.abc.2.17"), None, "a late ack of an abandoned wave");
        assert_eq!(row_answered(prefix, "_INBOX.abc.13.17"), None, "a late ack of an abandoned wave");
        assert_eq!(row_answered(prefix, "_INBOX.abc.3"), None);
        assert_eq!(row_answered(prefix, "_INBOX.abc.3.17.1"), None);
        assert_eq!(row_answered(prefix, "_INBOX.other.3.17"), None);
    }
}
