//! What operators see through `tracing`: a takeover, a torn tail cut at recovery, a store
//! error behind a 503, and one span per HTTP request with its outcome and a key digest — and
//! never the raw key or credentials. A small recording subscriber stands in for a real one.
#![cfg(all(feature = "http", not(loom)))]

#[cfg(feature = "kafka")]
#[path = "support/kafka.rs"]
mod kafka_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// One recorded event or span: its target or name, level, and fields as text.
#[derive(Clone, Debug)]
struct Seen {
    kind: &'static str,
    name: String,
    level: Level,
    fields: Vec<(String, String)>,
}

impl Seen {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    next: Arc<AtomicU64>,
}

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = vec![("#id".to_owned(), id.to_string())];
        span.record(&mut Fields(&mut fields));
        self.seen.lock().push(Seen {
            kind: "span",
            name: span.metadata().name().to_owned(),
            level: *span.metadata().level(),
            fields,
        });
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let id = span.into_u64().to_string();
        let mut seen = self.seen.lock();
        if let Some(s) = seen
            .iter_mut()
            .find(|s| s.kind == "span" && s.field("#id") == Some(id.as_str()))
        {
            values.record(&mut Fields(&mut s.fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Vec::new();
        if let Some(id) = CURRENT.with(|c| c.borrow().last().copied()) {
            fields.push(("#span".to_owned(), id.to_string()));
        }
        event.record(&mut Fields(&mut fields));
        self.seen.lock().push(Seen {
            kind: "event",
            name: event.metadata().target().to_owned(),
            level: *event.metadata().level(),
            fields,
        });
    }
    fn enter(&self, span: &Id) {
        CURRENT.with(|c| c.borrow_mut().push(span.into_u64()));
    }
    fn exit(&self, span: &Id) {
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(at) = c.iter().rposition(|&id| id == span.into_u64()) {
                c.remove(at);
            }
        });
    }
}

thread_local! {
    /// The spans entered on this thread, innermost last: an event belongs to the last.
    static CURRENT: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Recorder {
    fn events(&self, target: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.kind == "event" && s.name == target)
            .cloned()
            .collect()
    }
    fn spans(&self, name: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.kind == "span" && s.name == name)
            .cloned()
            .collect()
    }
}

#[test]
fn a_takeover_is_a_warning() {
    let rec = Recorder::default();
    tracing::subscriber::with_default(rec.clone(), || {
        let store = idemkv::Store::in_memory();
        let key = idemkv::Key::new("tenant-1", "k");
        let fp = idemkv::Fingerprint::of(b"x");
        let lease = Duration::from_millis(20);
        assert!(matches!(
            store.blocking_begin(key, fp, lease),
            Ok(idemkv::Begin::Acquired(_))
        ));
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            matches!(store.blocking_begin(key, fp, lease), Ok(idemkv::Begin::Acquired(l)) if l.is_takeover())
        );
    });
    let ev = rec.events("idemkv::lease");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].level, Level::WARN);
    assert_eq!(ev[0].field("scope"), Some("tenant-1"));
}

#[test]
fn a_torn_tail_cut_at_recovery_is_a_warning_with_the_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = idemkv::Store::builder().open(dir.path()).expect("open");
        let w = idemkv::Write::put_if_absent(idemkv::OwnedKey::new("s", "a"), b"v".to_vec());
        let _ = store.blocking_cas(&w).expect("cas");
    }
    // A batch a crash interrupted: garbage after the last batch of the newest segment.
    let wal = dir.path().join("wal");
    let mut segs: Vec<_> = std::fs::read_dir(&wal)
        .expect("wal")
        .map(|e| e.expect("entry").path())
        .collect();
    segs.sort();
    let last = segs.last().expect("a segment");
    let mut bytes = std::fs::read(last).expect("read");
    let end = bytes.iter().rposition(|&b| b != 0).expect("data") + 1;
    bytes.truncate(end);
    bytes.extend_from_slice(&[0x42; 40]);
    std::fs::write(last, &bytes).expect("write");

    let rec = Recorder::default();
    let report = tracing::subscriber::with_default(rec.clone(), || {
        let store = idemkv::Store::builder().open(dir.path()).expect("reopen");
        store.recovery_report().cloned().expect("report")
    });
    let torn = report.torn_tail.expect("a torn tail");
    let ev = rec.events("idemkv::recovery");
    let warn = ev
        .iter()
        .find(|e| e.level == Level::WARN)
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!(warn.field("offset"), Some(torn.offset.to_string().as_str()));
    assert!(
        ev.iter()
            .any(|e| e.field("message") == Some("store opened"))
    );
}

#[tokio::test(flavor = "current_thread")]
async fn one_span_per_request_with_its_outcome_and_never_the_raw_key() {
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use tower::{ServiceBuilder, ServiceExt};

    let rec = Recorder::default();
    let _guard = tracing::subscriber::set_default(rec.clone());
    let svc = ServiceBuilder::new()
        .layer(idemkv::http::IdempotencyLayer::new(
            idemkv::Store::in_memory(),
        ))
        .service(tower::service_fn(|_r: Request<Full<Bytes>>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
        }));
    let secret_key = "order-key-7f3a";
    for body in ["a", "a", "b"] {
        let req = Request::post("/orders")
            .header("idempotency-key", secret_key)
            .header("authorization", "Bearer s3cret-token")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let _ = svc.clone().oneshot(req).await.expect("response");
    }
    let spans = rec.spans("idempotency");
    let outcomes: Vec<_> = spans.iter().map(|s| s.field("outcome")).collect();
    assert_eq!(
        outcomes,
        [Some("fresh"), Some("replayed"), Some("mismatch")],
        "{spans:?}"
    );
    for s in &spans {
        assert_eq!(s.field("method"), Some("POST"));
        assert_eq!(s.field("path"), Some("/orders"));
        assert_eq!(s.field("key").map(str::len), Some(16), "{s:?}");
    }
    let all = format!("{:?}", rec.seen.lock());
    assert!(
        !all.contains(secret_key) && !all.contains("s3cret"),
        "{all}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_store_error_is_logged_and_the_body_stays_clean() {
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use tower::{ServiceBuilder, ServiceExt};

    let rec = Recorder::default();
    let _guard = tracing::subscriber::set_default(rec.clone());
    let store = idemkv::Store::builder()
        .max_records(1)
        .build()
        .expect("store");
    let svc = ServiceBuilder::new()
        .layer(idemkv::http::IdempotencyLayer::new(store))
        .service(tower::service_fn(|_r: Request<Full<Bytes>>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
        }));
    for key in ["k1", "k2"] {
        let req = Request::post("/orders")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from("x")))
            .expect("request");
        let res = svc.clone().oneshot(req).await.expect("response");
        if key == "k2" {
            assert_eq!(res.status(), 503);
            let body = res.into_body().collect().await.expect("body").to_bytes();
            assert!(!String::from_utf8_lossy(&body).contains("maximum of 1"));
        }
    }
    let ev = rec.events("idemkv::http");
    assert!(
        ev.iter().any(|e| e.level == Level::WARN
            && e.field("error").is_some_and(|t| t.contains("maximum of 1"))),
        "{ev:?}"
    );
}

/// Every handler run happens inside its message's `kafka_message` span: in a batch, and when a
/// message leaves the batch for the per-message path (a retry's second attempt).
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "current_thread")]
async fn each_kafka_handler_run_is_inside_its_message_span() {
    use idemkv::kafka::{HandlerError, Incoming, KafkaProcessor, Outcome};

    let rec = Recorder::default();
    let _guard = tracing::subscriber::set_default(rec.clone());
    let cluster = kafka_support::Cluster::new(1);
    let p = cluster.producer();
    for key in ["f0", "retry-x", "f1"] {
        kafka_support::send(&p, key, "x", &[("idempotency-key", key)]).await;
    }
    let processor = KafkaProcessor::builder(idemkv::Store::in_memory(), cluster.consumer("spans"))
        .topics(["requests"])
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build()
        .expect("processor");
    let handle = processor.handle();
    let running = tokio::spawn(processor.run(|msg: Incoming| async move {
        let key = String::from_utf8_lossy(msg.idempotency_key()).into_owned();
        tracing::info!(target: "test::handler", key = %key, offset = msg.offset(), "handled");
        if key == "retry-x" && msg.attempt() == 1 {
            return Err(HandlerError::retry("once"));
        }
        Ok(Outcome::done())
    }));
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while handle.stats().processed < 3 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.shutdown();
    let stats = running.await.expect("join").expect("run");
    assert_eq!(stats.processed, 3, "{stats:?}");
    let runs = rec.events("test::handler");
    assert_eq!(runs.len(), 4, "three messages, one retried: {runs:?}");
    let spans = rec.spans("kafka_message");
    for run in &runs {
        let span = run
            .field("#span")
            .and_then(|id| spans.iter().find(|s| s.field("#id") == Some(id)));
        let Some(span) = span else {
            panic!("a handler ran outside any message span: {run:?}");
        };
        assert_eq!(
            span.field("offset"),
            run.field("offset"),
            "{run:?} in {span:?}"
        );
    }
}
