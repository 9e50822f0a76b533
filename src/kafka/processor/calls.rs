//! The processor's part of exactly-once HTTP calls (`kafka/call.rs` has the protocol): the
//! calls record of each message, the follow-up messages an outcome turns into, the clean-up of
//! the attempts that did not win, and the reply of a request whose answer is its follow-up's.
//!
//! Invariants:
//! - Every URL an attempt PUT is in the message's calls record before the PUT is sent.
//! - The calls record is deleted only after every URL in it that is not the winning attempt's
//!   has answered DELETE with 2xx or 404; the winning attempt's URLs are deleted by their
//!   follow-ups, after those commit.

use std::pin::Pin;
use std::sync::atomic::AtomicU32;

use super::*;
use crate::adapter::outbox::{Outgoing, message_id};
use crate::kafka::PendingCall;
use crate::kafka::call::{CALL_URL, FOLLOW_UP};

type Recorder =
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> + Send + Sync;

/// Where one attempt's `invoke_http` records and makes its calls.
pub(crate) struct CallSite {
    pub(crate) caller: HttpCaller,
    pub(crate) scope: String,
    /// The attempt's fencing token: part of each call's unique id.
    pub(crate) token: u64,
    pub(crate) next_index: AtomicU32,
    pub(crate) record: Box<Recorder>,
}

impl std::fmt::Debug for CallSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSite")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// The TTL of a calls record: it outlives any attempt by far, and is deleted when clean.
const CALLS_TTL: Duration = Duration::from_secs(24 * 3600);

impl<St: IdempotencyStore + Clone> Shared<St> {
    fn calls_key(&self, msg: &Message) -> OwnedKey {
        OwnedKey::new(&self.calls_scope, msg.id())
    }

    /// Whether `msg` is a follow-up (on the follow-up topic, with a call URL): its URL.
    pub(super) fn follow_up_url<'m>(&self, msg: &'m Message) -> Option<&'m str> {
        let topic = self.cfg.follow_up_topic.as_deref()?;
        (&*msg.topic == topic)
            .then(|| msg.header_str(CALL_URL))
            .flatten()
    }

    /// The call site of the attempt holding `lease` on `msg` (`None` without a follow-up
    /// topic: `invoke_http` then refuses).
    pub(super) fn call_site(&self, msg: &Message, lease: &Lease) -> Option<Arc<CallSite>> {
        self.cfg.follow_up_topic.as_ref()?;
        let store = self.store.clone();
        let key = self.calls_key(msg);
        let record = move |url: String| {
            let (store, key) = (store.clone(), key.clone());
            Box::pin(async move { append_call(&store, &key, &url).await })
                as Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>
        };
        Some(Arc::new(CallSite {
            caller: self.caller.clone(),
            scope: self.scope.clone(),
            token: lease.token(),
            next_index: AtomicU32::new(0),
            record: Box::new(record),
        }))
    }

    /// The follow-up message of `call`: to the follow-up topic, with the request's key,
    /// payload and headers (so its reply goes where the request's would), and the call.
    pub(super) fn follow_up_message(&self, msg: &Message, call: &PendingCall) -> Outgoing {
        let topic = self.cfg.follow_up_topic.clone().unwrap_or_default();
        let mut out = Outgoing::to(topic).payload(msg.payload().unwrap_or_default().to_vec());
        if let Some(k) = msg.key() {
            out = out.key(k.to_vec());
        }
        for (n, v) in msg.headers() {
            let ours = [crate::kafka::IDEMPOTENCY_KEY, CALL_URL, FOLLOW_UP];
            if !ours.iter().any(|o| n.eq_ignore_ascii_case(o)) {
                out = out.header(n.to_owned(), v.to_vec());
            }
        }
        out.header(CALL_URL, call.url.clone())
            .header(FOLLOW_UP, call.tag.clone())
    }

    /// Deletes on the service every URL of `msg`'s calls record that is not in `winners`,
    /// then the record. `Some(Abandoned)` if the drain deadline came first (the record stays,
    /// for the redelivery).
    pub(super) async fn clean_calls(
        &self,
        msg: &Message,
        winners: &[&str],
        drain: &mut Drain,
    ) -> Result<Option<Disposition>, KafkaError> {
        let key = self.calls_key(msg);
        loop {
            let Some(Snapshot::Value(v)) = self.store.get(key.as_key()).await? else {
                return Ok(None);
            };
            let text = String::from_utf8_lossy(&v.value).into_owned();
            for url in text
                .lines()
                .filter(|u| !u.is_empty() && !winners.contains(u))
            {
                tracing::info!(target: "idemkv::kafka", url, "deleting the stored request of an attempt that did not win");
                tokio::select! {
                    () = self.caller.delete(url) => {}
                    () = drain_deadline(drain) => return Ok(Some(Disposition::Abandoned)),
                }
            }
            match self
                .store
                .cas(&Write::delete_if_version(key.clone(), v.version))
                .await?
            {
                CasOutcome::Applied { .. } => return Ok(None),
                // An attempt recorded a call meanwhile (it will lose: the result is in); again.
                CasOutcome::Conflict { .. } => {}
            }
        }
    }

    /// Phase 4 of a committed follow-up: DELETE its URL until 2xx or 404. `Some(Abandoned)` if
    /// the drain deadline came first (the redelivery deletes it).
    pub(super) async fn forget_call(&self, url: &str, drain: &mut Drain) -> Option<Disposition> {
        tokio::select! {
            () = self.caller.delete(url) => None,
            () = drain_deadline(drain) => Some(Disposition::Abandoned),
        }
    }

    /// Replies to a repeat of a request whose answer is its follow-up's: that follow-up's
    /// recorded reply, replayed, once it exists (waiting up to `wait_for_holder`).
    pub(super) async fn reply_from_follow_up(&self, msg: &Message, echo: &[(String, Vec<u8>)]) {
        let key = OwnedKey::new(&self.scope, message_id(msg.id(), 0));
        let until = Instant::now() + self.cfg.wait_for_holder;
        loop {
            if let Ok(Some(Snapshot::Completed(c))) = self.store.get(key.as_key()).await
                && let Ok(record) = StoredReply::decode(&c.response)
            {
                self.reply(msg, echo, &record, true).await;
                return;
            }
            if Instant::now() >= until {
                tracing::info!(target: "idemkv::kafka", "a repeated request's follow-up has not finished; its reply will come from the follow-up");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Adds `url` to the calls record at `key`.
async fn append_call<St: IdempotencyStore>(
    store: &St,
    key: &OwnedKey,
    url: &str,
) -> Result<(), Error> {
    loop {
        let write = match store.get(key.as_key()).await? {
            Some(Snapshot::Value(v)) => {
                let mut value = v.value;
                value.push(b'\n');
                value.extend_from_slice(url.as_bytes());
                Write::set_if_version(key.clone(), v.version, value)
            }
            _ => Write::put_if_absent(key.clone(), url.as_bytes().to_vec()),
        };
        if let CasOutcome::Applied { .. } = store.cas(&write.with_ttl(CALLS_TTL)).await? {
            return Ok(());
        }
    }
}
