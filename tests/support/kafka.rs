//! Shared by the Kafka tests: a mock cluster with the request, reply and dead-letter topics,
//! a producer of requests, and a reader of a topic.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use idemkv::kafka::MockKafka;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub struct Cluster {
    pub mock: MockKafka,
}

impl Cluster {
    pub fn new(request_partitions: i32) -> Cluster {
        let mock = MockKafka::start(1).unwrap();
        mock.create_topic("requests", request_partitions).unwrap();
        mock.create_topic("replies", 1).unwrap();
        mock.create_topic("dead", 1).unwrap();
        Cluster { mock }
    }

    pub fn client(&self) -> ClientConfig {
        self.mock.client_config()
    }

    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.client();
        c.set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("auto.commit.interval.ms", "100");
        c
    }

    pub fn producer(&self) -> FutureProducer {
        self.client().create().unwrap()
    }
}

/// A received message: key, payload, headers.
#[derive(Clone, Debug)]
pub struct Got {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub async fn send(p: &FutureProducer, key: &str, payload: &str, headers: &[(&str, &str)]) {
    let mut hs = OwnedHeaders::new();
    for (n, v) in headers {
        hs = hs.insert(Header {
            key: n,
            value: Some(*v),
        });
    }
    let record = FutureRecord::to("requests")
        .key(key)
        .payload(payload)
        .headers(hs);
    p.send(record, Duration::from_secs(5)).await.unwrap();
}

/// A consumer of `topic`'s partition 0 from its beginning, on the brokers of `config` (its own
/// `group.id`, which assignment does not use).
pub fn reader(mut config: ClientConfig, topic: &str) -> StreamConsumer {
    config.set("group.id", "test-reader");
    let consumer: StreamConsumer = config.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    consumer
}

/// A message's headers as text (lossy UTF-8; an absent value is empty), in order.
pub fn text_headers<C: FromIterator<(String, String)>>(m: &impl Message) -> C {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                    (h.key.to_owned(), v.into_owned())
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Reads `topic` (one partition) from the beginning until `n` messages or `within`.
pub async fn read(cluster: &Cluster, topic: &str, n: usize, within: Duration) -> Vec<Got> {
    let consumer = reader(cluster.client(), topic);
    let mut out = Vec::new();
    let until = tokio::time::Instant::now() + within;
    while out.len() < n {
        let Ok(Ok(m)) = tokio::time::timeout_at(until, consumer.recv()).await else {
            break;
        };
        out.push(Got {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers: text_headers(&m),
        });
    }
    out
}
