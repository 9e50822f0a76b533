//! Sending a script: one `EVALSHA`, and with [`RedisStoreBuilder::wait_for_replicas`] a
//! `WAIT` behind it in the same pipeline, so both reach one node over one connection; and, on
//! a cluster, our own following of `MOVED` and `ASK`.
//!
//! Invariants:
//! - A `WAIT` counts the replicas that have the writes of the connection it arrives on. It is
//!   pipelined right behind its script, so it runs on the node that ran the script, after it.
//!   (Sent as a command of its own, routed by slot, it could reach another node: the cluster
//!   client falls back to any connected node while the slot's master is unreachable, and that
//!   node's replicas would then vouch for a change they never saw.)
//! - A command is sent again only after an answer that proves it did not run: a redirect
//!   (`MOVED`, `ASK`), a refusal before execution (`TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`,
//!   `LOADING`, `READONLY`), no connection to the node, or a refused connect. A timeout or a
//!   dropped connection leaves the outcome unknown: it is the caller's `Error::Unavailable`,
//!   never a resend, since a script run twice answers for its own first run (a
//!   `put_if_absent` would report a conflict with itself). The cluster client's own retries
//!   are off for that reason (`retries(0)` in `builder.rs`).

use std::time::{Duration, Instant};

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;
use redis::{Cmd, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind, ToRedisArgs, Value};

use super::conn::Conn;

/// One call of a script: its keys and arguments. Our own builder rather than the redis
/// crate's `ScriptInvocation`, whose command cannot be put in a pipeline.
pub(super) struct Call<'s> {
    pub(super) script: &'s Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'s> Call<'s> {
    pub(super) fn new(script: &'s Script) -> Self {
        Call {
            script,
            keys: Vec::with_capacity(2),
            args: Vec::with_capacity(4),
        }
    }

    pub(super) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    pub(super) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// `EVALSHA <sha> <numkeys> <keys…> <args…>`.
    pub(super) fn evalsha(&self) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

/// What an error says about the command it answered.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Redirected, not run: send it to this node (`host:port`), with `ASKING` first if `ask`.
    Redirect { node: String, ask: bool },
    /// Not run: send it again once the cluster has settled.
    Later,
}

/// `Some` only where the error proves the command did not run, or, for a command that
/// changes nothing (`reads`), where running it again is harmless: any failure to answer.
fn refusal(e: &RedisError, reads: bool) -> Option<Refusal> {
    match e.kind() {
        ErrorKind::Server(kind @ (ServerErrorKind::Moved | ServerErrorKind::Ask)) => {
            let (node, _slot) = e.redirect_node()?;
            Some(Refusal::Redirect {
                node: node.to_owned(),
                ask: kind == ServerErrorKind::Ask,
            })
        }
        ErrorKind::Server(
            ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly,
        )
        | ErrorKind::ClusterConnectionNotFound => Some(Refusal::Later),
        _ if e.is_connection_refusal() => Some(Refusal::Later),
        _ if reads && (e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) => {
            Some(Refusal::Later)
        }
        _ => None,
    }
}

/// The first command's reply, if it is a server error, as an error. A pipeline answers each
/// command, and an error among them is not an `Err` of the whole. Only the first reply can
/// prove that nothing ran: once it succeeded, a later command's refusal (the `WAIT` behind a
/// script) says nothing about the script, which must not be sent again.
fn first_error(replies: &[Value]) -> Option<RedisError> {
    match replies.first() {
        Some(Value::ServerError(e)) => Some(RedisError::from(e.clone())),
        _ => None,
    }
}

fn split_node(node: &str) -> Option<(String, u16)> {
    let (host, port) = node.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

/// `cmds` as one pipeline, `ASKING` first if `asking`.
fn pipeline(cmds: &[Cmd], asking: bool) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    if asking {
        pipe.cmd("ASKING");
    }
    for cmd in cmds {
        pipe.add_command(cmd.clone());
    }
    pipe
}

/// Sends `cmds` once, as one pipeline when there are several: to the node `to` (`ASKING`
/// first if `ask`), or where the cluster client routes them (by their first key). One reply
/// per command of `cmds`.
async fn send_once(
    c: &mut ClusterConnection,
    cmds: &[Cmd],
    to: Option<&(String, u16)>,
    ask: bool,
) -> RedisResult<Vec<Value>> {
    use redis::aio::ConnectionLike;
    if to.is_none() && cmds.len() == 1 {
        return Ok(vec![c.req_packed_command(&cmds[0]).await?]);
    }
    let pipe = pipeline(cmds, ask);
    match to {
        Some((host, port)) => {
            let node = SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            };
            c.route_pipeline(pipe, usize::from(ask), cmds.len(), node)
                .await
        }
        None => c.req_packed_commands(&pipe, 0, cmds.len()).await,
    }
}

/// Sends `cmds` on a cluster, again after each answer that proves they did not run (see the
/// module's invariants), or after any failure if they are `reads`, within `budget`; the last
/// answer once it is spent.
pub(super) async fn cluster_send(
    c: &mut ClusterConnection,
    cmds: &[Cmd],
    budget: Duration,
    reads: bool,
) -> RedisResult<Vec<Value>> {
    let until = Instant::now() + budget;
    let mut pause = Duration::from_millis(10);
    let mut to = None;
    let mut ask = false;
    loop {
        let result = send_once(c, cmds, to.as_ref(), ask).await;
        let error = match &result {
            Ok(replies) => first_error(replies),
            Err(e) => Some(e.clone()),
        };
        let Some(refused) = error.as_ref().and_then(|e| refusal(e, reads)) else {
            return result;
        };
        if Instant::now() >= until {
            return result;
        }
        match refused {
            Refusal::Redirect { node, ask: a } => {
                // An unparsable address: by slot again, the client's map is being rebuilt.
                to = split_node(&node);
                ask = a && to.is_some();
            }
            Refusal::Later => {
                to = None;
                ask = false;
                tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now())))
                    .await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

impl Conn {
    /// Sends `cmds` (one pipeline when there are several; they may change data, so they are
    /// resent only after a proven refusal) and returns a reply per command: a server error
    /// among them is a `Value::ServerError`, a failure of the whole an `Err`.
    pub(super) async fn send(&mut self, cmds: &[Cmd]) -> RedisResult<Vec<Value>> {
        use redis::aio::ConnectionLike;
        match self {
            Conn::Single(c) if cmds.len() == 1 => Ok(vec![c.req_packed_command(&cmds[0]).await?]),
            Conn::Single(c) => {
                let pipe = pipeline(cmds, false);
                c.req_packed_commands(&pipe, 0, cmds.len()).await
            }
            Conn::Cluster(c, budget) => cluster_send(c, cmds, *budget, false).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a server answers with `-<line>`.
    fn server(line: &str) -> RedisError {
        let value = redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
        first_error(&[value]).unwrap()
    }

    #[test]
    fn only_the_first_reply_decides_a_resend() {
        let tryagain = redis::parse_redis_value(b"-TRYAGAIN try later\r\n").unwrap();
        // The script answered: whatever follows it, nothing is sent again.
        assert!(first_error(&[Value::Int(1), tryagain.clone()]).is_none());
        assert!(first_error(&[tryagain.clone(), Value::Int(1)]).is_some());
        assert!(first_error(&[]).is_none());
    }

    fn refusal_of(e: &RedisError) -> Option<Refusal> {
        let change = refusal(e, false);
        assert_eq!(change, refusal(e, true), "a refusal is one for reads too");
        change
    }

    #[test]
    fn only_answers_that_prove_the_command_did_not_run_are_resent() {
        assert_eq!(
            refusal_of(&server("MOVED 3999 127.0.0.1:6381")),
            Some(Refusal::Redirect {
                node: "127.0.0.1:6381".into(),
                ask: false
            })
        );
        assert_eq!(
            refusal_of(&server("ASK 3999 127.0.0.1:6381")),
            Some(Refusal::Redirect {
                node: "127.0.0.1:6381".into(),
                ask: true
            })
        );
        for later in [
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
            "MASTERDOWN Link with MASTER is down",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
        ] {
            assert_eq!(refusal_of(&server(later)), Some(Refusal::Later), "{later}");
        }
        // A script's own error, or a lost answer: the outcome is the caller's, never resent.
        assert_eq!(refusal_of(&server("ERR user_script:1: boom")), None);
        assert_eq!(refusal_of(&server("NOSCRIPT No matching script")), None);
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(refusal(&timeout, false), None);
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(refusal(&dropped, false), None);
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(refusal(&refused, false), Some(Refusal::Later));
        // A read is sent again after a lost answer too: running it twice changes nothing.
        assert_eq!(refusal(&timeout, true), Some(Refusal::Later));
        assert_eq!(refusal(&dropped, true), Some(Refusal::Later));
        assert_eq!(refusal(&server("ERR user_script:1: boom"), true), None);
    }

    #[test]
    fn a_call_is_one_evalsha_with_its_keys_then_its_args() {
        let script = Script::new("return 1");
        let mut call = Call::new(&script);
        call.key("k1").key(b"k2".as_slice()).arg(7u64).arg("x");
        let packed = call.evalsha().get_packed_command();
        let want = format!(
            "*7\r\n$7\r\nEVALSHA\r\n$40\r\n{}\r\n$1\r\n2\r\n$2\r\nk1\r\n$2\r\nk2\r\n$1\r\n7\r\n$1\r\nx\r\n",
            script.get_hash()
        );
        assert_eq!(String::from_utf8(packed).unwrap(), want);
    }
}
