//! A small HTTP(S) GET client for `banger update`: one connection per
//! request, redirects followed, TLS with the Mozilla roots (webpki-roots),
//! bodies streamed with a byte cap. What a download is worth is decided by
//! the release signature and sha256s, never by the transport, so plain
//! `http://` is allowed (mirrors, loopback tests).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How long connecting (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server may stay silent (headers, or between body chunks).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nothing answered: DNS, connect, TLS, or the connection broke before
    /// a response.
    #[error("Cannot reach {url}: {why}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// What failed.
        why: String,
    },
    /// The server answered with something other than 200.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL tried.
        url: String,
        /// Its status.
        status: StatusCode,
    },
    /// The body ended early or broke off.
    #[error("The download of {url} broke off after {got} bytes: {why}")]
    Truncated {
        /// The URL.
        url: String,
        /// Bytes received.
        got: u64,
        /// What the HTTP layer said.
        why: String,
    },
    /// The body is larger than the caller allows.
    #[error("{url} sent more than the {limit} bytes expected")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap.
        limit: u64,
    },
    /// The URL itself is unusable.
    #[error("Invalid URL {url:?}: {why}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An HTTP(S) client.
#[derive(Clone)]
pub struct Fetcher {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

impl Fetcher {
    /// A client trusting the Mozilla root certificates.
    pub fn new() -> Result<Fetcher, FetchError> {
        Fetcher::with_roots(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    }

    fn with_roots(roots: rustls::RootCertStore) -> Result<Fetcher, FetchError> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Unreachable {
            url: String::new(),
            why: format!("TLS setup failed ({e})"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Fetcher {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// The whole body of `url`, at most `limit` bytes.
    pub async fn get_bytes(&self, url: &str, limit: u64) -> Result<Vec<u8>, FetchError> {
        let mut out = Vec::new();
        self.get_to(url, limit, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Streams the body of `url` into `sink`, at most `limit` bytes.
    /// Returns the byte count. A body shorter than its Content-Length is
    /// [`FetchError::Truncated`]; a sink error is returned as is.
    pub async fn get_to(
        &self,
        url: &str,
        limit: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<u64, FetchError> {
        let (url, resp) = self.get(url).await?;
        if let Some(len) = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > limit
        {
            return Err(FetchError::TooLarge { url, limit });
        }
        let mut body = resp.into_body();
        let mut got: u64 = 0;
        let truncated = |got: u64, why: String| FetchError::Truncated {
            url: url.clone(),
            got,
            why,
        };
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
                Err(_) => {
                    return Err(truncated(
                        got,
                        format!("no data for {}s", IDLE_TIMEOUT.as_secs()),
                    ));
                }
                Ok(None) => return Ok(got),
                Ok(Some(Err(e))) => return Err(truncated(got, e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            got += data.len() as u64;
            if got > limit {
                return Err(FetchError::TooLarge { url, limit });
            }
            sink(&data).map_err(|e| truncated(got, format!("writing it failed ({e})")))?;
        }
    }

    /// The 200 response for `url` after redirects, and the final URL.
    async fn get(&self, url: &str) -> Result<(String, Response<Incoming>), FetchError> {
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let resp = self.get_once(&current).await?;
            let status = resp.status();
            if status.is_redirection() {
                let Some(next) = resp
                    .headers()
                    .get(hyper::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                else {
                    return Err(FetchError::Status {
                        url: current,
                        status,
                    });
                };
                current = resolve(&current, next)?;
                continue;
            }
            if status != StatusCode::OK {
                return Err(FetchError::Status {
                    url: current,
                    status,
                });
            }
            return Ok((current, resp));
        }
        Err(FetchError::Unreachable {
            url: url.to_string(),
            why: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    async fn get_once(&self, url: &str) -> Result<Response<Incoming>, FetchError> {
        let bad = |why: &str| FetchError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let unreachable = |why: String| FetchError::Unreachable {
            url: url.to_string(),
            why,
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("only http:// and https:// URLs are fetched")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((bare_host, port)))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| unreachable(e.to_string()))?;
        let stream: Box<dyn Stream> = if tls {
            let name = rustls::pki_types::ServerName::try_from(bare_host.to_string())
                .map_err(|_| bad("the host is not a valid TLS server name"))?;
            let s = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(name, tcp))
                .await
                .map_err(|_| unreachable("the TLS handshake timed out".into()))?
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
            Box::new(s)
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            // Errors surface through the response and body futures.
            let _ = conn.await;
        });
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let req = Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::USER_AGENT,
                concat!("banger/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| bad(&e.to_string()))?;
        tokio::time::timeout(IDLE_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {}s", IDLE_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))
    }
}

/// `location` (absolute, or a path on the same origin) against `base`.
fn resolve(base: &str, location: &str) -> Result<String, FetchError> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(location.to_string());
    }
    let uri: Uri = base.parse().map_err(|_| FetchError::BadUrl {
        url: base.to_string(),
        why: "not a URL".into(),
    })?;
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map(|a| a.as_str()).unwrap_or("")
    );
    let joined = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = uri.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{location}")
    };
    let (path, query) = match joined.split_once('?') {
        Some((p, q)) => (p, format!("?{q}")),
        None => (joined.as_str(), String::new()),
    };
    Ok(format!("{origin}{}{query}", without_dot_segments(path)))
}

/// `path` with `.` and `..` segments applied (RFC 3986, 5.2.4).
fn without_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_locations_resolve_against_the_request() {
        let base = "https://a.example:8443/rel/latest/manifest";
        for (location, want) in [
            ("https://b.example/x", "https://b.example/x"),
            ("/other/m", "https://a.example:8443/other/m"),
            ("m2", "https://a.example:8443/rel/latest/m2"),
            (
                "../0.2.0/manifest?x=1",
                "https://a.example:8443/rel/0.2.0/manifest?x=1",
            ),
            ("/a/./b/../c/", "https://a.example:8443/a/c/"),
            ("../..", "https://a.example:8443/"),
        ] {
            assert_eq!(resolve(base, location).unwrap(), want, "{location}");
        }
    }

    /// A loopback HTTPS server for `localhost` with a self-signed
    /// certificate, answering `reply` to every request. Returns its port
    /// and certificate.
    async fn serve_https(
        reply: &'static [u8],
    ) -> (u16, rustls::pki_types::CertificateDer<'static>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls.write_all(reply).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (port, der)
    }

    #[tokio::test]
    async fn https_is_verified_against_the_trusted_roots() {
        let (port, cert) = serve_https(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let url = format!("https://localhost:{port}/m");
        // The Mozilla roots do not know a self-signed certificate.
        let e = Fetcher::new()
            .unwrap()
            .get_bytes(&url, 10)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FetchError::Unreachable { why, .. } if why.contains("TLS") && why.contains("certificate")),
            "{e:?}"
        );
        // Trusted, the same server is fetched over TLS.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let body = Fetcher::with_roots(roots)
            .unwrap()
            .get_bytes(&url, 10)
            .await
            .unwrap();
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn redirects_are_followed_to_the_file() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let reply: &[u8] = if req.starts_with("GET /latest/manifest ") {
                    b"HTTP/1.1 302 Found\r\nlocation: ../v2/manifest\r\ncontent-length: 0\r\n\r\n"
                } else if req.starts_with("GET /v2/manifest ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                };
                let _ = s.write_all(reply).await;
            }
        });
        let f = Fetcher::new().unwrap();
        let body = f
            .get_bytes(&format!("{base}/latest/manifest"), 10)
            .await
            .unwrap();
        assert_eq!(body, b"ok");
        let e = f.get_bytes(&format!("{base}/nope"), 10).await.unwrap_err();
        assert!(
            matches!(e, FetchError::Status { status, .. } if status == StatusCode::NOT_FOUND),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_unreachable() {
        // Bind, note the port, close: nothing listens there any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/x");
        let e = Fetcher::new()
            .unwrap()
            .get_bytes(&url, 10)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FetchError::Unreachable { url: u, .. } if *u == url),
            "{e:?}"
        );
        let e = Fetcher::new()
            .unwrap()
            .get_bytes("ftp://h/x", 10)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::BadUrl { .. }), "{e:?}");
    }
}
