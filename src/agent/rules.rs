//! Rules: progress, events and context derived from the lines daemons already write.
//! (Interface placeholder; filled in by the rules work.)

use crate::config::raw::RawRule;
use crate::config::Config;
use std::path::Path;

/// One problem with one rule, for the config loader to locate.
#[derive(Debug, Clone)]
pub struct RuleProblem {
    /// 0-based index of the rule in its daemon's list.
    pub index: usize,
    /// The rule's key at fault (`match`, `progress.node_id`, …).
    pub key: String,
    pub value: Option<String>,
    pub reason: String,
}

/// A daemon's compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<RawRule>,
}

impl Rules {
    pub fn compile(raw: &[RawRule]) -> Result<Rules, Vec<RuleProblem>> {
        Ok(Rules {
            rules: raw.to_vec(),
        })
    }
    pub fn len(&self) -> usize {
        self.rules.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
    pub fn describe(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Sticky values (interim).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sticky(pub serde_json::Map<String, serde_json::Value>);

impl Sticky {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(self.0.clone())
    }
    pub fn from_json(v: &serde_json::Value) -> Sticky {
        Sticky(v.as_object().cloned().unwrap_or_default())
    }
}

impl Rules {
    pub fn apply(&self, _record: &mut crate::model::Record, _sticky: &mut Sticky) {}
}

/// `check-config --sample FILE`.
pub fn print_sample(_config: &Config, _daemon: Option<&str>, _file: &Path) -> anyhow::Result<()> {
    anyhow::bail!("--sample is not implemented yet")
}
