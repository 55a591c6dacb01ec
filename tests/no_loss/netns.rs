//! A host of its own on this machine: a network namespace joined to the
//! test by two veth pairs, one its clients reach it through and one its
//! broker link goes through (relayed to the broker on 127.0.0.1), which the
//! test takes down to cut the node off from the broker, and not from its
//! clients. Addresses come from the benchmarking range 198.18.0.0/15.
//!
//! Needs root (`ip netns`); everything made is deleted on drop, also when
//! the test fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A namespace with a client link and a broker link.
pub struct Island {
    /// The namespace's name, for `ip netns exec`.
    pub name: String,
    /// The namespace's address on the client link: its gateway listens
    /// there.
    pub address: IpAddr,
    /// Where the node reaches the broker: a relay on the broker link's
    /// host end.
    pub broker: SocketAddr,
    /// The host ends of the two links.
    client_link: String,
    broker_link: String,
    relay: JoinHandle<()>,
}

impl Island {
    /// Make the namespace, its links and the broker relay.
    pub async fn new() -> Self {
        let pid = std::process::id();
        // One subnet per test process; two /30s of 198.18.0.0/15.
        let net = 16 + (pid % 200) as u8;
        let name = format!("tidegate-{pid}");
        let client_link = format!("tg{pid}c");
        let broker_link = format!("tg{pid}b");
        // Left by an earlier run with this pid that was killed.
        remove(&name, &client_link, &broker_link);
        let made = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(
            made.is_ok_and(|status| status.success()),
            "ip netns add {name} failed: this test needs root and iproute2 (it gives a node a \
             network of its own to cut)"
        );
        for (link, prefix) in [(&client_link, [198, 18]), (&broker_link, [198, 19])] {
            let peer = format!("{link}n");
            let host = format!("{}.{}.{net}.1/30", prefix[0], prefix[1]);
            let inside = format!("{}.{}.{net}.2/30", prefix[0], prefix[1]);
            ip(&["link", "add", link, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", &name]);
            ip(&["addr", "add", &host, "dev", link]);
            ip(&["link", "set", link, "up"]);
            ip(&[
                "netns", "exec", &name, "ip", "addr", "add", &inside, "dev", &peer,
            ]);
            ip(&["netns", "exec", &name, "ip", "link", "set", &peer, "up"]);
        }
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        let listener = TcpListener::bind((Ipv4Addr::new(198, 19, net, 1), 0))
            .await
            .expect("bind the broker relay on the broker link");
        let broker = listener.local_addr().expect("relay address");
        let relay = tokio::spawn(async move {
            while let Ok((mut node, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut node, &mut broker).await;
                    }
                });
            }
        });
        Self {
            name,
            address: IpAddr::V4(Ipv4Addr::new(198, 18, net, 2)),
            broker,
            client_link,
            broker_link,
            relay,
        }
    }

    /// The AMQP URL the node reaches the broker at.
    pub fn broker_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.broker)
    }

    /// Take the broker link down: packets are dropped, nothing says so.
    pub fn cut(&self) {
        ip(&["link", "set", &self.broker_link, "down"]);
    }

    /// Bring the broker link back up.
    pub fn mend(&self) {
        ip(&["link", "set", &self.broker_link, "up"]);
    }
}

impl Drop for Island {
    fn drop(&mut self) {
        self.relay.abort();
        remove(&self.name, &self.client_link, &self.broker_link);
    }
}

/// Delete a namespace and the host ends of its links, if they are there.
fn remove(name: &str, client_link: &str, broker_link: &str) {
    let quiet = |args: &[&str]| {
        let _ = Command::new("ip")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status();
    };
    quiet(&["netns", "del", name]);
    quiet(&["link", "del", client_link]);
    quiet(&["link", "del", broker_link]);
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {}: {status}", args.join(" "));
}
