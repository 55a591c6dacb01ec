//! The container image (`deploy/image/`), run with podman the way a pod runs
//! it: as 65532 on a read-only root file system, TLS from a mounted
//! certificate, state on a volume. Ignored by default: `tests/run.sh` builds
//! the image and runs these with `TIDEGATE_IMAGE` (and
//! `TIDEGATE_CHART_CONFIG`, the Helm chart's rendered `tidegate.toml`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    BROKER, Client, Endpoint, delete_exchanges, delete_queue, drain_queue, http_get, round_trip,
    unique_queue,
};

/// The uid and gid the image runs as.
const USER: u32 = 65532;

/// A container of the image, removed on drop.
struct Container {
    name: String,
    child: Option<Child>,
    wss: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

/// How to run the image: its own configuration, or a mounted one.
struct Run<'a> {
    image: &'a str,
    queue: &'a str,
    /// Mounted at `/etc/tidegate/config/tidegate.toml` and passed with
    /// `--config`, as the chart's pods do.
    config: Option<&'a Path>,
    env: Vec<(&'a str, String)>,
    /// Who owns the state volume's root.
    state: StateRoot,
}

/// The state volume's root as the platforms make it.
#[derive(Clone, Copy)]
enum StateRoot {
    /// The image's user's own, 0700 (a host directory, a named volume).
    Own,
    /// `root:65532` 2775: what Kubernetes' `fsGroup` makes of a volume.
    FsGroup,
}

/// The broker objects a run made, deleted on drop (also when it failed).
struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // Its own thread: Drop runs inside the test's runtime.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    delete_exchanges(&exchanges).await;
                    for queue in &queues {
                        delete_queue(queue).await;
                    }
                });
        })
        .join();
    }
}

/// The image under test, from `TIDEGATE_IMAGE`.
fn image() -> String {
    std::env::var("TIDEGATE_IMAGE").expect(
        "TIDEGATE_IMAGE names the image to test (deploy/image/build.sh builds it; \
         tests/run.sh sets it)",
    )
}

/// A directory the image's user owns, or may read.
fn directory(path: &Path, owner: Option<u32>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).expect("create directory");
    if let Some(uid) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown (run as root)");
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A self-signed certificate for localhost in `dir` as `tls.crt` and
/// `tls.key`, the names of a `kubernetes.io/tls` secret; the key readable
/// by the image's group only, as the chart mounts it (0440, fsGroup).
fn certificate(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let key_pair = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key_pair).expect("certificate");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write certificate");
    let key = dir.join("tls.key");
    std::fs::write(&key, key_pair.serialize_pem()).expect("write key");
    std::os::unix::fs::chown(&key, Some(0), Some(USER)).expect("chown key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).expect("chmod key");
    dir.join("tls.crt")
}

impl Container {
    fn start(run: &Run<'_>, tls: &Path, state: &Path) -> Self {
        let name = format!("tidegate-test-{}", uuid::Uuid::now_v7().simple());
        let mut command = Command::new("podman");
        command
            // crun cannot set up cgroups in this sandbox; runc can, and the
            // default limits cannot be raised here: both are given.
            .args(["--runtime", "runc", "run", "--rm", "--name", &name])
            // Read-only as in a pod: no writable tmpfs on /tmp and /run
            // either (podman adds them to --read-only by default).
            .args([
                "--network",
                "host",
                "--read-only",
                "--read-only-tmpfs=false",
            ])
            .args(["--pull", "never"])
            .args([
                "--ulimit",
                "nofile=4096:4096",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .arg("--volume")
            .arg(format!("{}:/etc/tidegate/tls:ro", tls.display()))
            .arg("--volume")
            .arg(format!("{}:/var/lib/tidegate", state.display()))
            // Host networking: ephemeral ports instead of 8443 and 9090.
            .args(["--env", "TIDEGATE__SERVER__LISTEN=127.0.0.1:0"])
            .args(["--env", "TIDEGATE__ADMIN__LISTEN=127.0.0.1:0"])
            .arg("--env")
            .arg(format!("TIDEGATE__QUEUE__URL={BROKER}"))
            .arg("--env")
            .arg(format!("TIDEGATE__QUEUE__QUEUE={}", run.queue))
            .arg("--env")
            .arg(format!("TIDEGATE__QUEUE__PUSH_QUEUE={}.push", run.queue))
            .args(["--env", "TIDEGATE__SERVER__DRAIN_WINDOW=1s"]);
        for (key, value) in &run.env {
            command.arg("--env").arg(format!("{key}={value}"));
        }
        if let Some(config) = run.config {
            command.arg("--volume").arg(format!(
                "{}:/etc/tidegate/config/tidegate.toml:ro",
                config.display()
            ));
        }
        command.arg(run.image);
        if run.config.is_some() {
            command.args(["serve", "--config", "/etc/tidegate/config/tidegate.toml"]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman (apt install podman runc)");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("Tidegate listening on wss://") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let mut container = Self {
            name,
            child: Some(child),
            wss: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            log,
        };
        let Ok(line) = rx.recv_timeout(Duration::from_secs(120)) else {
            panic!("the container did not start; its log:\n{}", container.log());
        };
        let (wss, rest) = line.split_once("/ (admin http://").expect("listening line");
        container.wss = wss.parse().expect("wss address");
        container.admin = rest
            .trim_end_matches("/metrics)")
            .parse()
            .expect("admin address");
        container
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// `podman stop`: SIGTERM (the image's stop signal), then the exit
    /// status of the gateway (podman run's own).
    fn stop(&mut self) -> Option<i32> {
        let status = Command::new("podman")
            .args(["stop", "--time", "60", &self.name])
            .stdout(Stdio::null())
            .status()
            .expect("podman stop");
        assert!(status.success(), "podman stop: {status}");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "podman run did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The user the gateway runs as, as the host sees it.
    fn user(&self) -> String {
        let output = Command::new("podman")
            .args(["top", &self.name, "huser"])
            .output()
            .expect("podman top");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--time", "0", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Start the image, get an echo over wss:// with the mounted certificate,
/// find the copy in RabbitMQ, stop it with SIGTERM and see the drain.
async fn serves_echo_and_drains(run: Run<'_>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    directory(&tls, None, 0o755);
    let cert = certificate(&tls);
    let state = dir.path().join("state");
    match run.state {
        StateRoot::Own => directory(&state, Some(USER), 0o700),
        StateRoot::FsGroup => {
            directory(&state, None, 0o2775);
            std::os::unix::fs::chown(&state, Some(0), Some(USER)).expect("chown state");
        }
    }

    let mut container = Container::start(&run, &tls, &state);
    assert_eq!(
        container.user(),
        USER.to_string(),
        "the gateway runs as {USER}"
    );
    let endpoint = Endpoint {
        wss: container.wss,
        cert,
    };
    let mut client = endpoint.connect("/").await.unwrap_or_else(|e| {
        panic!(
            "wss:// with the mounted certificate: {e}\n{}",
            container.log()
        )
    });
    let reply = round_trip(&mut client, Message::Text("from the image".into())).await;
    assert_eq!(reply, Message::Text("from the image".into()));
    let copies = drain_queue(run.queue, 1, Duration::from_secs(10)).await;
    assert_eq!(copies.len(), 1, "one copy in {}", run.queue);
    assert_eq!(copies[0].body, b"from the image");
    let (status, _) = http_get(container.admin, "/readyz", &[]).await;
    assert_eq!(status, 200, "ready");
    // The gateway wrote its state on the volume, as its own user.
    let written: Vec<(std::ffi::OsString, u32)> = std::fs::read_dir(&state)
        .expect("state")
        .map(|entry| {
            use std::os::unix::fs::MetadataExt;
            let entry = entry.expect("entry");
            (entry.file_name(), entry.metadata().expect("metadata").uid())
        })
        .collect();
    assert!(
        !written.is_empty() && written.iter().all(|(_, uid)| *uid == USER),
        "the state volume holds {written:?}, not the gateway's own files:\n{}",
        container.log()
    );

    // SIGTERM while the client keeps sending: its connection is closed
    // with 1001 over the drain window, every message it got a reply for
    // has its copy in the queue, and the gateway exits 0.
    let sending = tokio::spawn(send_until_closed(client));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = std::thread::spawn(move || {
        let code = container.stop();
        (code, container.log())
    });
    let (replied, code) = tokio::time::timeout(Duration::from_secs(30), sending)
        .await
        .expect("closed within the drain")
        .unwrap();
    let (exit, log) = tokio::task::spawn_blocking(move || stopping.join().unwrap())
        .await
        .unwrap();
    assert_eq!(code, Some(1001), "closed going away; log:\n{log}");
    assert_eq!(exit, Some(0), "exit status after SIGTERM; log:\n{log}");
    assert!(
        !replied.is_empty(),
        "no reply while sending before the stop"
    );
    let copies = drain_queue(run.queue, replied.len(), Duration::from_secs(10)).await;
    let bodies: std::collections::HashSet<Vec<u8>> =
        copies.into_iter().map(|copy| copy.body).collect();
    let missing: Vec<&String> = replied
        .iter()
        .filter(|text| !bodies.contains(text.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} replied messages have no copy: {missing:?}",
        missing.len(),
        replied.len()
    );
    for said in [
        "termination signal",
        "connections closed over the drain window",
        "shutdown complete",
    ] {
        assert!(log.contains(said), "the log says {said:?}:\n{log}");
    }
}

/// Send numbered messages one after the other until the gateway closes
/// the connection: the messages that got their reply, and the close code.
async fn send_until_closed(mut client: Client) -> (Vec<String>, Option<u16>) {
    let mut replied = Vec::new();
    for n in 0.. {
        let text = format!("during the drain {n}");
        if client
            .send(Message::Text(text.clone().into()))
            .await
            .is_err()
        {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(20), client.next()).await {
            Ok(Some(Ok(Message::Text(reply)))) if reply.as_str() == text => replied.push(text),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (replied, frame.map(|frame| u16::from(frame.code)));
            }
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (replied, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image: tests/run.sh builds it and sets TIDEGATE_IMAGE"]
async fn the_image_serves_wss_with_a_mounted_certificate_and_drains_on_sigterm() {
    let image = image();
    let queue = unique_queue();
    let _cleanup = Cleanup {
        queues: vec![queue.clone(), format!("{queue}.push")],
        exchanges: Vec::new(),
    };
    serves_echo_and_drains(Run {
        image: &image,
        queue: &queue,
        config: None,
        env: Vec::new(),
        state: StateRoot::Own,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image and the chart's configuration: tests/run.sh sets both"]
async fn the_image_runs_the_helm_charts_configuration() {
    let image = image();
    let config = PathBuf::from(std::env::var("TIDEGATE_CHART_CONFIG").expect(
        "TIDEGATE_CHART_CONFIG: the chart's rendered tidegate.toml (deploy/check.sh writes it)",
    ));
    let queue = unique_queue();
    // The chart's pods form a cluster: this one on a cluster of its own.
    let cluster = format!("cluster-test-{}", uuid::Uuid::now_v7().simple());
    let _cleanup = Cleanup {
        queues: vec![
            queue.clone(),
            format!("{queue}.push"),
            format!("{cluster}.registry"),
        ],
        exchanges: ["heartbeats", "nodes", "groups"]
            .iter()
            .map(|kind| format!("{cluster}.{kind}"))
            .collect(),
    };
    serves_echo_and_drains(Run {
        image: &image,
        queue: &queue,
        config: Some(&config),
        env: vec![
            ("TIDEGATE__CLUSTER__NAME", cluster.clone()),
            ("TIDEGATE__SERVER__NODE_ID", "image-test".to_owned()),
        ],
        state: StateRoot::FsGroup,
    })
    .await;
}
