//! Opening the connection with or without TLS according to libpq's `sslmode`, with rustls:
//! `disable` plain; `allow`/`prefer` TLS when the server offers it, unverified; `require`
//! TLS, unverified unless a CA file is given (then like `verify-ca`, as libpq does);
//! `verify-ca` chain checked against the CA file (or the system store); `verify-full` chain
//! and host name checked.
//!
//! The connection future is spawned on its own task; errors on it are logged, not lost.
//! The whole handshake (TCP, TLS, login) has one deadline, `connect_timeout`: a server that
//! accepts the connection and then says nothing must not hold the caller forever.

use super::connect::{DbTarget, SslMode};
use anyhow::{anyhow, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Connects according to `target.ssl_mode`.
pub async fn connect(target: &DbTarget) -> anyhow::Result<Client> {
    Ok(connect_with_task(target).await?.0)
}

/// Connects, and returns the handle of the task that drives the connection too: aborting it
/// closes the socket at once, even while a request waits for a reply that never comes.
pub async fn connect_with_task(
    target: &DbTarget,
) -> anyhow::Result<(Client, tokio::task::AbortHandle)> {
    let limit = target.limits.connect_timeout;
    match tokio::time::timeout(limit, handshake(target)).await {
        Ok(result) => result,
        Err(_) => Err(anyhow!(
            "no reply from the database within {} of connecting (connect_timeout)",
            humantime::format_duration(limit)
        )),
    }
}

async fn handshake(target: &DbTarget) -> anyhow::Result<(Client, tokio::task::AbortHandle)> {
    if target.ssl_mode == SslMode::Disable {
        let (client, conn) = target.config.connect(NoTls).await?;
        return Ok((client, spawn_connection(conn)));
    }
    let tls = MakeRustlsConnect::new(client_config(target)?);
    let (client, conn) = target.config.connect(tls).await?;
    Ok((client, spawn_connection(conn)))
}

fn spawn_connection<F>(conn: F) -> tokio::task::AbortHandle
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, "database connection closed");
        }
    })
    .abort_handle()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration for the target's mode.
fn client_config(target: &DbTarget) -> anyhow::Result<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS setup: {e}"))?;
    let mode = match (target.ssl_mode, &target.ca_file) {
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(roots(target.ca_file.as_deref())?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| anyhow!("TLS setup: {e}"))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        _ => Arc::new(NoVerification(provider)),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The CA file's certificates, or the system's trust store.
fn roots(ca_file: Option<&Path>) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let iter = CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("cannot read CA file {}", path.display()))?;
            for cert in iter {
                let cert = cert.map_err(|e| anyhow!("{e}")).with_context(|| {
                    format!("invalid certificate in CA file {}", path.display())
                })?;
                store.add(cert).map_err(|e| {
                    anyhow!("invalid certificate in CA file {}: {e}", path.display())
                })?;
            }
            if store.is_empty() {
                return Err(anyhow!("CA file {} holds no certificate", path.display()));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(anyhow!(
                    "no system CA certificates found: set ca_file or sslrootcert for sslmode=verify-ca/verify-full"
                ));
            }
        }
    }
    Ok(store)
}

/// `verify-ca`: the chain must lead to a trusted CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require` without a CA: encrypted, but the certificate is not checked (libpq
/// semantics). Handshake signatures are still verified.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
