//! WebSocket clients for the scenarios: `ws://` or `wss://` to a loopback
//! address, optionally from a chosen source address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Any byte stream a WebSocket can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A client WebSocket.
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Where to connect, parsed once.
#[derive(Clone)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    addr: SocketAddr,
    tls: Option<TlsConnector>,
}

impl Target {
    /// Parse `ws://IP:PORT/path` or `wss://IP:PORT/path` (loopback only).
    /// TLS certificates are not verified: the benchmark measures, it does
    /// not authenticate, and the servers use self-signed certificates.
    ///
    /// # Errors
    /// When the URL is not of that form.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (secure, rest) = if let Some(rest) = url.strip_prefix("wss://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("ws://") {
            (false, rest)
        } else {
            bail!("{url}: expected ws:// or wss://");
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        let authority = authority.replace("localhost", "127.0.0.1");
        let addr: SocketAddr = authority
            .parse()
            .with_context(|| format!("{url}: expected an IP address and port"))?;
        if !addr.ip().is_loopback() {
            bail!("{url}: benchmarks only run against loopback addresses");
        }
        let tls = secure.then(insecure_connector);
        Ok(Self {
            url: url.to_owned(),
            addr,
            tls,
        })
    }

    /// Open a WebSocket, from `source` if given (to spread connections over
    /// 127.0.0.x so ephemeral ports do not run out).
    ///
    /// # Errors
    /// When the TCP, TLS or WebSocket handshake fails.
    pub async fn connect(&self, source: Option<IpAddr>) -> anyhow::Result<Ws> {
        let tcp = match source {
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(self.addr).await?
            }
            None => TcpStream::connect(self.addr).await?,
        };
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Io> = match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                Box::new(connector.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        let request = self.url.as_str().into_client_request()?;
        let config = WebSocketConfig::default()
            .read_buffer_size(16 << 10)
            .write_buffer_size(16 << 10);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        Ok(ws)
    }
}

/// The n-th source address of a spread over 127.0.0.2 to 127.0.0.254.
pub fn spread_source(n: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 2 + (n % 253) as u8])
}

fn insecure_connector() -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Accepts any certificate (benchmarks against self-signed servers only).
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
