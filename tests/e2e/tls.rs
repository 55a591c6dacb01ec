//! TLS: certificates reloaded when their files change, without dropping
//! connections; several certificates chosen by SNI; TLS 1.2 and 1.3 only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{Client, Gateway, Options, eventually, round_trip};

/// Write a self-signed certificate for `names` to `dir/<stem>.crt|.key`.
fn certificate(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let paths = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    paths
}

fn der(cert: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(cert).unwrap()
}

/// Connect over TLS as `name`, trusting `roots`; the client and the leaf
/// certificate the gateway presented.
async fn connect_as(
    gateway: &Gateway,
    name: &str,
    roots: &[&Path],
) -> (Client, CertificateDer<'static>) {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(der(root)).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = TcpStream::connect(gateway.wss).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let request = format!("wss://{name}:{}/", gateway.wss.port())
        .into_client_request()
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    (ws, leaf)
}

fn tls_config(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"100ms\"\n{extra}\n[functions.echo]\nwasm = \"builtin:echo\"\n[routes]\n\"/\" = \"echo\"\n",
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_clients_and_open_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "served", &["localhost"]);
    let first = dir.path().join("first.crt");
    std::fs::copy(&cert, &first).unwrap();
    let gateway = Gateway::start(Options::default().config(&tls_config(&cert, &key, "")));

    let (mut open, leaf) = connect_as(&gateway, "localhost", &[&first]).await;
    assert_eq!(leaf, der(&first));

    // cert-manager writes the new pair in place.
    let (new_cert, new_key) = certificate(dir.path(), "next", &["localhost"]);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    eventually(
        "the new pair is loaded",
        Duration::from_secs(10),
        || async {
            gateway
                .metric("tidegate_tls_reloads_total{outcome=\"ok\"}")
                .await
                >= 1.0
        },
    )
    .await;
    let (mut fresh, leaf) = connect_as(&gateway, "localhost", &[&first, &new_cert]).await;
    assert_eq!(leaf, der(&new_cert), "new clients get the new certificate");
    assert_eq!(
        round_trip(&mut fresh, Message::Text("new".into())).await,
        Message::Text("new".into())
    );
    assert_eq!(
        round_trip(&mut open, Message::Text("still open".into())).await,
        Message::Text("still open".into()),
        "the connection made before the rotation was not dropped"
    );

    // A broken file is not taken: the pair in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    eventually(
        "the bad file is noticed",
        Duration::from_secs(10),
        || async {
            gateway
                .metric("tidegate_tls_reloads_total{outcome=\"error\"}")
                .await
                >= 1.0
        },
    )
    .await;
    let (_, leaf) = connect_as(&gateway, "localhost", &[&first, &new_cert]).await;
    assert_eq!(leaf, der(&new_cert));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_chosen_by_the_sni_name() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "default", &["localhost"]);
    let (api_cert, api_key) = certificate(dir.path(), "api", &["api.example.test"]);
    let (wild_cert, wild_key) = certificate(dir.path(), "wild", &["*.chat.example.test"]);
    let extra = format!(
        "[[tls.sni]]\ncert = \"{}\"\nkey = \"{}\"\n[[tls.sni]]\ncert = \"{}\"\nkey = \"{}\"\n",
        api_cert.display(),
        api_key.display(),
        wild_cert.display(),
        wild_key.display()
    );
    let gateway = Gateway::start(Options::default().config(&tls_config(&cert, &key, &extra)));
    let roots = [cert.as_path(), api_cert.as_path(), wild_cert.as_path()];
    for (name, expected) in [
        ("api.example.test", &api_cert),
        ("eu.chat.example.test", &wild_cert),
        ("localhost", &cert),
    ] {
        let (mut client, leaf) = connect_as(&gateway, name, &roots).await;
        assert_eq!(leaf, der(expected), "{name}");
        assert_eq!(
            round_trip(&mut client, Message::Text(name.into())).await,
            Message::Text(name.into())
        );
    }
}

/// What `openssl s_client` made of a handshake.
#[derive(Debug, PartialEq)]
enum Handshake {
    Done,
    /// The gateway answered with a TLS alert.
    RefusedByGateway,
    /// Anything else (for example the client could not offer what was
    /// asked): the check would prove nothing.
    Inconclusive(String),
}

/// `openssl s_client` offering only `args`.
fn openssl_handshake(gateway: &Gateway, args: &[&str]) -> Handshake {
    let output = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &gateway.wss.to_string()])
        .args(["-servername", "localhost"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (apt install openssl)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() && stdout.contains("Cipher is") && !stdout.contains("(NONE)") {
        Handshake::Done
    } else if stderr.contains("alert") {
        Handshake::RefusedByGateway
    } else {
        Handshake::Inconclusive(stderr.into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_1_2_and_1_3_with_aead_suites_are_offered() {
    let gateway = Gateway::start(Options::default());
    tokio::task::block_in_place(|| {
        // The client is told to allow anything (security level 0), so a
        // refusal comes from the gateway.
        let legacy = "DEFAULT:@SECLEVEL=0";
        assert_eq!(openssl_handshake(&gateway, &["-tls1_3"]), Handshake::Done);
        assert_eq!(openssl_handshake(&gateway, &["-tls1_2"]), Handshake::Done);
        for old in ["-tls1_1", "-tls1"] {
            assert_eq!(
                openssl_handshake(&gateway, &[old, "-cipher", legacy]),
                Handshake::RefusedByGateway,
                "{old}"
            );
        }
        // CBC suites (the dev certificate is ECDSA).
        for cbc in [
            "ECDHE-ECDSA-AES128-SHA",
            "ECDHE-ECDSA-AES256-SHA384",
            "AES128-SHA",
        ] {
            assert_eq!(
                openssl_handshake(
                    &gateway,
                    &["-tls1_2", "-cipher", &format!("{cbc}:@SECLEVEL=0")]
                ),
                Handshake::RefusedByGateway,
                "{cbc}"
            );
        }
    });
}
