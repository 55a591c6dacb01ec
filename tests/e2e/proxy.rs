//! A TCP forwarder in front of the broker that a test can hold closed
//! (every connection is cut at once), open, and close again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A port that cuts every connection until [`BrokerProxy::open`]. It stays
/// bound throughout, so no other test can take it meanwhile.
pub struct BrokerProxy {
    /// The proxy's address.
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    task: JoinHandle<()>,
    /// The connections being forwarded.
    forwarding: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl BrokerProxy {
    /// Listen on a fresh loopback port, cutting every connection.
    pub async fn closed() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicBool::new(false));
        let forwarding: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let is_open = open.clone();
        let connections = forwarding.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_open.load(Ordering::Relaxed) {
                    // Closed: the AMQP handshake ends at once, like a
                    // broker that is down.
                    drop(client);
                    continue;
                }
                let connection = tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
                let mut connections = connections.lock().unwrap();
                connections.retain(|c| !c.is_finished());
                connections.push(connection);
            }
        });
        Self {
            addr,
            open,
            task,
            forwarding,
        }
    }

    /// The AMQP URL pointing at this proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Start forwarding to the real broker.
    pub fn open(&self) {
        self.open.store(true, Ordering::Relaxed);
    }

    /// Cut every connection now (both ends see it closed at once, as when
    /// the broker goes down) and every new one until opened again.
    pub fn close(&self) {
        self.open.store(false, Ordering::Relaxed);
        for connection in self.forwarding.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.close();
    }
}
