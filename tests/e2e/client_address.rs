//! Behind a load balancer: the PROXY protocol gives the real client's
//! address to the per-address limits and to the function, and only the
//! configured balancers may send it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Client, Endpoint, Gateway, Options, round_trip, tcp_from};

/// The faulty function (it can show the address it was told) on `/`,
/// behind a balancer on 127.0.0.1, one connection per client address.
fn gateway_behind_a_balancer() -> Gateway {
    Gateway::start(
        Options::default()
            .config(&format!(
                r#"
                [functions.faulty]
                wasm = "{}"
                [routes]
                "/" = "faulty"
                "#,
                tidegate_functions::FAULTY_PATH
            ))
            .env("TIDEGATE__SERVER__PROXY_PROTOCOL_FROM", "127.0.0.1/32")
            .env("TIDEGATE__SERVER__MAX_CONNECTIONS_PER_IP", "1"),
    )
}

fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 {port} 443\r\n").into_bytes()
}

fn v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&client);
    header.extend_from_slice(&[127, 0, 0, 1]);
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&443u16.to_be_bytes());
    header
}

/// Connect from `from` after sending `header`; a refused upgrade gives
/// its HTTP status.
async fn connect(
    endpoint: &Endpoint,
    from: &str,
    header: &[u8],
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let mut tcp = tcp_from(from, endpoint.wss).await;
    tcp.write_all(header).await.unwrap();
    endpoint.connect_on(tcp, "/?show=remote-addr").await
}

/// The address the function was told, from its claims.
async fn remote_addr(client: &mut Client) -> String {
    let Message::Text(claims) = round_trip(client, Message::Text("claims".into())).await else {
        panic!("claims are text");
    };
    claims
        .lines()
        .find_map(|line| line.strip_prefix("remote-addr="))
        .unwrap_or_else(|| panic!("no remote-addr claim in {claims:?}"))
        .to_owned()
}

fn status(refused: tokio_tungstenite::tungstenite::Error) -> u16 {
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => response.status().as_u16(),
        other => panic!("refused without an HTTP status: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_header_names_the_client_to_limits_and_functions() {
    let gateway = gateway_behind_a_balancer();
    let endpoint = gateway.endpoint();

    let mut first = connect(&endpoint, "127.0.0.1", &v1("203.0.113.7", 51234))
        .await
        .expect("v1 header");
    assert_eq!(remote_addr(&mut first).await, "203.0.113.7:51234");
    let mut second = connect(&endpoint, "127.0.0.1", &v2([203, 0, 113, 8], 40000))
        .await
        .expect("v2 header");
    assert_eq!(remote_addr(&mut second).await, "203.0.113.8:40000");

    // The per-address limit (1) counts the real client, not the balancer.
    let refused = connect(&endpoint, "127.0.0.1", &v1("203.0.113.7", 51235))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status(refused), 429);

    // A peer that is not a configured balancer is taken as it comes.
    let mut direct = connect(&endpoint, "127.0.0.2", b"").await.expect("direct");
    assert!(remote_addr(&mut direct).await.starts_with("127.0.0.2:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_connection_without_a_proxy_header_is_closed() {
    let gateway = gateway_behind_a_balancer();
    for bytes in [
        // A TLS ClientHello's first bytes, where the header should be.
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"PROXY TCP4 not-an-address 127.0.0.1 1 443\r\n",
    ] {
        let mut tcp: TcpStream = tcp_from("127.0.0.1", gateway.wss).await;
        tcp.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer");
    }
    gateway
        .metric_reaches(
            "tidegate_connections_rejected_total{reason=\"proxy_protocol\"}",
            2.0,
        )
        .await;
}
