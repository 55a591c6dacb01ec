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
    // Ready from the first answer on: whoever saw the addresses may ask.
    let ready = admin_get(addresses.admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

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

/// Whether this process may give files away and mount file systems, as the
/// tests of volumes owned by others need; prints why a test is skipped when
/// not.
fn is_root() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        println!("skipped: volumes owned by other users need root to set up");
    }
    root
}

/// The mode bits of `path` (not following a link) and whether the
/// gateway's user owns it.
fn mode_and_ours(path: &Path) -> (u32, bool) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).expect("exists");
    assert!(meta.is_dir(), "{} is a directory", path.display());
    (
        meta.mode() & 0o7777,
        meta.uid() == rustix::process::geteuid().as_raw(),
    )
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

async fn build(settings: Settings) -> Result<App, String> {
    App::build(settings).await.map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_root_owned_by_root_and_group_writable_holds_private_subdirectories() {
    if !is_root() {
        return;
    }
    // A PersistentVolumeClaim with fsGroup 65532 is mounted as root:65532
    // mode 2775; also as a uid that is not the gateway's.
    for owner in [0, 65534] {
        let base = tempfile::tempdir().unwrap();
        let volume = base.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::os::unix::fs::chown(&volume, Some(owner), Some(65532)).unwrap();
        chmod(&volume, 0o2775);
        let app = build(settings(&volume, &[]))
            .await
            .unwrap_or_else(|e| panic!("owner {owner}: {e}"));
        for dir in ["tls", "artifacts"] {
            let (mode, ours) = mode_and_ours(&volume.join(dir));
            assert_eq!(mode & 0o777, 0o700, "{dir} of a volume owned by {owner}");
            assert!(ours, "{dir} belongs to the gateway's user");
        }
        assert_eq!(mode_and_ours(&volume).0, 0o2775, "the volume is left alone");
        drop(app);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_writable_state_directory_like_an_empty_dir_holds_private_subdirectories() {
    let base = tempfile::tempdir().unwrap();
    let volume = base.path().join("empty-dir");
    std::fs::create_dir(&volume).unwrap();
    chmod(&volume, 0o777);
    let app = build(settings(&volume, &[]))
        .await
        .expect("an emptyDir volume as the state directory");
    for dir in ["tls", "artifacts"] {
        let (mode, ours) = mode_and_ours(&volume.join(dir));
        assert_eq!(mode & 0o777, 0o700, "{dir}");
        assert!(ours, "{dir} belongs to the gateway's user");
    }
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_directory_of_another_user_in_the_state_directory_is_refused() {
    if !is_root() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let volume = base.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    std::os::unix::fs::chown(&volume, Some(0), Some(65532)).unwrap();
    chmod(&volume, 0o2775);
    // Someone else's directory where the gateway keeps its native code.
    let artifacts = volume.join("artifacts");
    std::fs::create_dir(&artifacts).unwrap();
    std::os::unix::fs::chown(&artifacts, Some(65534), Some(65534)).unwrap();
    chmod(&artifacts, 0o700);
    let Err(error) = build(settings(&volume, &[])).await else {
        panic!("another user's artifact directory was used");
    };
    assert!(error.contains("runtime.artifact_dir"), "{error}");
    assert!(error.contains("owned by uid 65534"), "{error}");
    assert!(error.contains("subdirectory"), "says what to do: {error}");
}

/// A read-only file system mounted on a temporary directory, unmounted when
/// dropped (also when a test fails): a read-only root file system.
struct ReadOnlyMount {
    dir: Option<tempfile::TempDir>,
}

impl ReadOnlyMount {
    /// `None` when this process may not mount.
    fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=64k,mode=0755", "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(status) if status.success() => Some(Self { dir: Some(dir) }),
            other => {
                println!("skipped: cannot mount a read-only tmpfs ({other:?})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().map(tempfile::TempDir::path).unwrap()
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::process::Command::new("umount")
                .arg(dir.path())
                .status();
            drop(dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_state_directory_that_nothing_uses_does_not_stop_the_gateway() {
    if !is_root() {
        return;
    }
    let Some(read_only) = ReadOnlyMount::mount() else {
        return;
    };
    // The default /var/lib/tidegate on a read-only root file system: it
    // does not exist and cannot be created.
    let state = read_only.path().join("var/lib/tidegate");
    assert!(std::fs::create_dir_all(&state).is_err(), "read-only");
    let volume = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let cert = gateway::dev::generate_certificate(certs.path()).expect("a certificate");
    let path = |p: &Path| p.display().to_string();
    let (cert_file, key_file) = (path(&cert.files.cert), path(&cert.files.key));
    let artifacts = path(&volume.path().join("artifacts"));
    let spool = path(&volume.path().join("spool"));
    let app = build(settings(
        &state,
        &[
            ("TIDEGATE__TLS__CERT", &cert_file),
            ("TIDEGATE__TLS__KEY", &key_file),
            ("TIDEGATE__RUNTIME__ARTIFACT_DIR", &artifacts),
            ("TIDEGATE__QUEUE__SPOOL_DIR", &spool),
        ],
    ))
    .await
    .expect("the state directory is not used");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let addresses = app.addresses();
    let running = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    let mut client = connect(addresses.wss, &cert.files.cert).await;
    client
        .send(Message::Text("read-only".into()))
        .await
        .unwrap();
    assert_eq!(
        client.next().await.unwrap().unwrap(),
        Message::Text("read-only".into())
    );
    drop(client);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("run returns after the drain")
        .unwrap()
        .expect("a clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_reads_the_proxy_header_from_a_balancer_too() {
    let state = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
        [functions.faulty]
        wasm = "{}"
        [routes]
        "/" = "faulty"
        "#,
        tidegate_functions::FAULTY_PATH
    );
    let mut env: Vec<(String, String)> = [
        ("TIDEGATE__SERVER__LISTEN", "127.0.0.1:0"),
        ("TIDEGATE__SERVER__PLAIN_LISTEN", "127.0.0.1:0"),
        ("TIDEGATE__SERVER__PROXY_PROTOCOL_FROM", "127.0.0.1"),
        ("TIDEGATE__ADMIN__LISTEN", "127.0.0.1:0"),
        ("TIDEGATE__QUEUE__MODE", "off"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    env.push((
        "TIDEGATE__SERVER__STATE_DIR".to_owned(),
        state.path().display().to_string(),
    ));
    let settings = Settings::from_toml(&toml, env, true).expect("valid settings");
    let app = App::build(settings).await.expect("the gateway builds");
    let plain = app.addresses().plain.expect("a plain listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));

    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(plain).await.unwrap();
    tcp.write_all(b"PROXY TCP4 198.51.100.9 10.0.0.1 40123 80\r\n")
        .await
        .unwrap();
    let request = format!("ws://127.0.0.1:{}/?show=remote-addr", plain.port())
        .into_client_request()
        .unwrap();
    let (mut client, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("upgrade after the header");
    client.send(Message::Text("claims".into())).await.unwrap();
    let Some(Ok(Message::Text(claims))) = client.next().await else {
        panic!("claims");
    };
    assert!(
        claims
            .lines()
            .any(|l| l == "remote-addr=198.51.100.9:40123"),
        "{claims}"
    );
    drop(client);
    stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), running).await;
}
