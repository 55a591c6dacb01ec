//! The whole gateway in-process: `App::build` binds `127.0.0.1:0`, the test
//! reads the addresses from it (no binary, no stdout to parse), talks real
//! TLS WebSockets to it, and ends it through the shutdown future.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::app::App;
use gateway::config::Settings;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Settings for `--dev` on free loopback ports, without queue copies,
/// keeping state in `state`.
fn settings(state: &Path, extra: &[(&str, &str)]) -> Settings {
    let mut env = vec![
        (
            "TIDEGATE__SERVER__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "TIDEGATE__ADMIN__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        ("TIDEGATE__QUEUE__MODE".to_owned(), "off".to_owned()),
        (
            "TIDEGATE__SERVER__STATE_DIR".to_owned(),
            state.display().to_string(),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Settings::from_toml("", env, true).expect("valid settings")
}

async fn connect(
    wss: std::net::SocketAddr,
    cert: &Path,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert).expect("dev certificate") {
        roots.add(cert.expect("certificate")).expect("add root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(wss).await.expect("tcp");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("tls");
    let request = format!("wss://localhost:{}/", wss.port())
        .into_client_request()
        .unwrap();
    tokio_tungstenite::client_async(request, tls)
        .await
        .expect("upgrade")
        .0
}

async fn admin_get(admin: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(admin).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_in_process_on_the_ports_it_reports_and_drains_on_shutdown() {
    let state = tempfile::tempdir().unwrap();
    let app = App::build(settings(state.path(), &[]))
        .await
        .expect("the gateway builds");
    let addresses = app.addresses();
    assert!(addresses.wss.port() != 0 && addresses.admin.port() != 0);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));

    let cert = state.path().join("tls").join("dev-cert.pem");
    let mut client = connect(addresses.wss, &cert).await;
    client
        .send(Message::Text("in-process".into()))
        .await
        .unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::Text("in-process".into())
    );
    let ready = admin_get(addresses.admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    stop.send(()).unwrap();
    let close = loop {
        match client.next().await {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    drop(client);
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run returns after the drain")
        .unwrap()
        .expect("a clean shutdown");
    // The listeners are closed.
    assert!(TcpStream::connect(addresses.wss).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_others_can_write_to_is_refused_at_build() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let error = match App::build(settings(state.path(), &[])).await {
        Ok(_) => panic!("a world-writable state directory was used"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("server.state_dir"), "{error}");
}
