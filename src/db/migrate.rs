//! Interim placeholder; replaced by the migrations work.

/// Applies the embedded migrations.
pub async fn apply(_client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    anyhow::bail!("migrations are not embedded yet")
}
