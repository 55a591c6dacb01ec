//! A TCP forwarder in front of the broker that a test can hold closed
//! (nothing listens on its port) and then open.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A port that refuses connections until [`BrokerProxy::open`].
pub struct BrokerProxy {
    /// The proxy's address.
    pub addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl BrokerProxy {
    /// Reserve a loopback port with nothing listening on it.
    pub async fn closed() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        Self { addr, task: None }
    }

    /// The AMQP URL pointing at this proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Start forwarding to the real broker.
    pub async fn open(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind the proxy port");
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
            }
        }));
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
