//! Everything that talks to PostgreSQL outside the agent's sink: connecting, migrations,
//! schema checks and the queries behind the operator commands.

pub mod connect;
pub mod migrate;
pub mod queries;
pub mod schema;
pub mod throwaway;
pub mod tls;
pub mod typed;
pub mod usable;

pub use connect::{connect, DbTarget};
