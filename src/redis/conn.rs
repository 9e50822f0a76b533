//! The connection a store talks through: one self-reconnecting connection to a single server,
//! or the redis crate's cluster client, which routes each command by the slot of its first
//! key; `MOVED`, `ASK` and failovers are followed by `call.rs`, which resends a command only
//! when its answer proves it did not run.
//!
//! Invariant: every script's keys share one slot (see `keys.rs`), so routing by the first key
//! sends the whole script to the node that owns all of them.

use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture};

use super::*;

/// Where the store's records live.
#[derive(Clone, Debug)]
pub(super) enum Topology {
    /// One server (or a proxy in front of several), at this URL.
    Single(String),
    /// A Redis Cluster, found through these seed nodes.
    Cluster(Vec<String>),
}

/// A connection of either kind; cheap to clone (both are handles to one multiplexed
/// connection per node).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    /// The cluster client (its own retries off), and how long a command may be resent for
    /// (the store's timeout).
    Cluster(ClusterConnection, std::time::Duration),
}

/// Commands other than scripts go through this: `HGETALL`, `CLUSTER NODES`, a script's
/// `SCRIPT LOAD`, none of which changes a record, so on a cluster they are sent again after
/// any failure, within the timeout (`call.rs`).
impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, budget) => Box::pin(async move {
                let mut replies =
                    call::cluster_send(c, std::slice::from_ref(cmd), *budget, true).await?;
                replies.pop().ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "no reply to a command",
                    ))
                })
            }),
        }
    }

    /// Our own pipelines go through `Conn::send`; this one (the trait's) is passed on as is.
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c, _) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
        }
    }
}

impl Conn {
    /// Runs `cmd` on the node at `host:port` (cluster), or on the one server.
    pub(super) async fn on_node(
        &mut self,
        node: Option<(&str, u16)>,
        cmd: Cmd,
    ) -> redis::RedisResult<Value> {
        match (self, node) {
            (Conn::Cluster(c, _), Some((host, port))) => {
                let to = SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                };
                c.route_command(cmd, RoutingInfo::SingleNode(to)).await
            }
            (c, _) => cmd.query_async(c).await,
        }
    }

    /// The masters of a cluster as `(host, port)`, from `CLUSTER NODES` of any node; `[None]`
    /// for a single server. For walks of the whole keyspace (`SCAN` is per node).
    pub(super) async fn masters(&mut self) -> redis::RedisResult<Vec<Option<(String, u16)>>> {
        let Conn::Cluster(c, _) = self else {
            return Ok(vec![None]);
        };
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(c).await?;
        Ok(cluster_masters(&nodes).into_iter().map(Some).collect())
    }
}

/// The live masters listed in `CLUSTER NODES` output: `<id> <ip:port@cport[,host]> <flags> …`.
pub(super) fn cluster_masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, addr, flags) = (f.next()?, f.next()?, f.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|x| x.starts_with("fail")) {
                return None;
            }
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// The TLS material for `rediss://` connections (feature `redis-tls`).
#[derive(Clone, Debug, Default)]
pub(super) struct Tls {
    #[cfg(feature = "redis-tls")]
    pub(super) root_cert: Option<Vec<u8>>,
    #[cfg(feature = "redis-tls")]
    pub(super) client: Option<(Vec<u8>, Vec<u8>)>,
}

impl Tls {
    /// A client for `url`, with this TLS material if any was given.
    pub(super) fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        #[cfg(feature = "redis-tls")]
        if let Some(certs) = self.certificates() {
            return redis::Client::build_with_tls(url, certs);
        }
        redis::Client::open(url)
    }

    #[cfg(feature = "redis-tls")]
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        if self.root_cert.is_none() && self.client.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self.client.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: self.root_cert.clone(),
        })
    }

    /// A cluster client for `nodes` whose connects and responses time out after `timeout`,
    /// with this TLS material if any was given.
    pub(super) fn cluster_builder(
        &self,
        nodes: &[String],
        timeout: Duration,
    ) -> redis::cluster::ClusterClientBuilder {
        let b = ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(timeout)
            .response_timeout(timeout);
        #[cfg(feature = "redis-tls")]
        if let Some(certs) = self.certificates() {
            return b.certs(certs);
        }
        b
    }
}

/// Installs ring as rustls's process-wide provider if none is yet: every TLS connection
/// (with or without our own certificates) builds its rustls config from it. Called once, by
/// `connect`.
pub(super) fn install_tls_provider() {
    #[cfg(feature = "redis-tls")]
    {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_from_cluster_nodes() {
        let out = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,node-3 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
9fd4c5a2b3e6f1a7d8c0b2e4f6a8c0d2e4f6a8c0 127.0.0.1:30005@31005 master,fail - 0 0 5 disconnected
";
        assert_eq!(
            cluster_masters(out),
            vec![
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30003),
                ("127.0.0.1".to_owned(), 30001)
            ]
        );
    }
}
