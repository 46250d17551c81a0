//! Opening the connection with or without TLS according to `sslmode`.
//!
//! The connection future is spawned on its own task; errors on it are logged, not lost.

use super::connect::{DbTarget, SslMode};
use anyhow::bail;
use tokio_postgres::{Client, NoTls};

/// Connects according to `target.ssl_mode`.
pub async fn connect(target: &DbTarget) -> anyhow::Result<Client> {
    match target.ssl_mode {
        SslMode::Disable | SslMode::Allow | SslMode::Prefer => {
            let (client, conn) = target.config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "database connection closed");
                }
            });
            Ok(client)
        }
        mode => bail!("sslmode {mode:?} needs TLS, which this build does not support yet"),
    }
}
