//! A private Redis Cluster: six `redis-server --cluster-enabled yes`
//! processes (three masters, one replica each) on free ports, joined with
//! `redis-cli --cluster create`, SIGKILLed on drop. Failure detection is
//! quick (`cluster-node-timeout` [`NODE_TIMEOUT_MS`]) so that a killed
//! master's replica takes over within seconds.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_shared::testing;

use crate::WAIT;
use crate::processes::{Proc, Sandbox};

/// `cluster-node-timeout`: how long a node may be unreachable before the
/// others count it as failed (and its replica is promoted).
pub const NODE_TIMEOUT_MS: u64 = 1_000;

const NODES: usize = 6;

/// One node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// The slot ranges it serves (masters only), inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// Six nodes started and joined; see the module doc.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    procs: Vec<Option<Proc>>,
}

impl RedisCluster {
    /// None (with the reason printed) when `redis-server` or `redis-cli` is
    /// not installed.
    pub async fn start(sandbox: &Sandbox) -> Option<Self> {
        for tool in ["redis-server", "redis-cli"] {
            if Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
            {
                report!("SKIPPED: {tool} is not installed");
                return None;
            }
        }
        let dir = sandbox.dir.join("redis-cluster");
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let ports = cluster_ports(NODES);
        let mut procs = Vec::new();
        for port in &ports {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut command = Command::new("redis-server");
            command.args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &NODE_TIMEOUT_MS.to_string(),
                // A replica takes over however long ago it last heard its master.
                "--cluster-replica-validity-factor",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &node_dir.display().to_string(),
            ]);
            procs.push(Some(Proc::spawn(command, &node_dir.join("redis.log"))));
        }
        let cluster = Self { ports, dir, procs };
        for port in &cluster.ports {
            let url = format!("redis://127.0.0.1:{port}");
            testing::eventually(WAIT, "cluster node to answer", || async {
                node_query::<String>(&url, redis::cmd("PING"))
                    .await
                    .is_some()
            })
            .await;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let log = std::fs::File::create(cluster.dir.join("create.log")).expect("create log");
        let status = create
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .status()
            .expect("redis-cli --cluster create");
        assert!(
            status.success(),
            "redis-cli --cluster create failed: see {}",
            cluster.dir.join("create.log").display()
        );
        cluster.wait_healthy(3).await;
        Some(cluster)
    }

    /// `redis+cluster://` with every node: Keel's cluster form of `REDIS_URL`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let at = self.ports.iter().position(|p| *p == port).expect("a node");
        if let Some(mut proc) = self.procs[at].take() {
            proc.kill();
        }
    }

    fn alive(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports
            .iter()
            .zip(&self.procs)
            .filter(|(_, proc)| proc.is_some())
            .map(|(port, _)| *port)
    }

    /// The nodes as a live node sees them.
    pub async fn nodes(&self) -> Vec<ClusterNode> {
        for port in self.alive() {
            let url = format!("redis://127.0.0.1:{port}");
            if let Some(text) =
                node_query::<String>(&url, redis::cmd("CLUSTER").arg("NODES").clone()).await
            {
                return parse_nodes(&text);
            }
        }
        panic!("no cluster node answers");
    }

    /// The port of the master serving `key`'s slot.
    pub async fn master_of(&self, key: &str) -> u16 {
        let slot = slot_of(key);
        self.nodes()
            .await
            .into_iter()
            .find(|n| {
                n.master && !n.failed && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Waits until every live node says `cluster_state:ok` and `masters`
    /// healthy masters, all of them running (a killed one replaced by its
    /// replica), serve all 16384 slots.
    pub async fn wait_healthy(&self, masters: usize) {
        testing::eventually(WAIT, "the cluster to be ok", || async {
            for port in self.alive() {
                let url = format!("redis://127.0.0.1:{port}");
                let Some(info) =
                    node_query::<String>(&url, redis::cmd("CLUSTER").arg("INFO").clone()).await
                else {
                    return false;
                };
                if !info.contains("cluster_state:ok") {
                    return false;
                }
            }
            let nodes = self.nodes().await;
            let serving: Vec<&ClusterNode> = nodes
                .iter()
                .filter(|n| n.master && !n.failed && !n.slots.is_empty())
                .collect();
            let covered: u32 = serving
                .iter()
                .flat_map(|n| &n.slots)
                .map(|(a, b)| u32::from(b - a) + 1)
                .sum();
            let alive: Vec<u16> = self.alive().collect();
            if serving.len() == masters
                && covered == 16_384
                && serving.iter().all(|n| alive.contains(&n.port))
            {
                true
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                false
            }
        })
        .await;
    }
}

/// One command on one node (a plain connection); None on any failure.
async fn node_query<T: redis::FromRedisValue>(url: &str, cmd: redis::Cmd) -> Option<T> {
    let client = redis::Client::open(url).ok()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()?;
    cmd.query_async(&mut conn).await.ok()
}

/// `CLUSTER NODES` lines: `<id> <ip:port@bus> <flags> <master> <ping> <pong>
/// <epoch> <link> <slot>...`.
fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields
                .get(1)?
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(ClusterNode {
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail"),
                slots,
            })
        })
        .collect()
}

/// The cluster slot of `key` (CRC16 of its hash tag, or of the whole key).
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for byte in tagged.unwrap_or(bytes) {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// `n` ports whose cluster bus ports (port + 10000) are free too.
fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut seed = uuid::Uuid::new_v4().as_u128();
    while ports.len() < n {
        let port = 20_000 + (seed % 20_000) as u16;
        seed = seed.rotate_left(13) ^ 0x9e37_79b9_7f4a_7c15;
        if ports.contains(&port) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            ports.push(port);
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12_182);
        assert_eq!(slot_of("keel:jobs:stream:{echo}:high"), slot_of("echo"));
        assert_eq!(slot_of("echo"), 14_438);
    }
}
