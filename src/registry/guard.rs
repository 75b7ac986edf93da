//! A flow's `[dataflow.guard]` table in the overlay: its own guard thresholds over `[guard]` of
//! the configuration (docs/guard.md).

use serde::Deserialize;

use crate::guard::settings::{check_fraction, GuardOverride};

/// The table as written; every key optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GuardDoc {
    enabled: Option<bool>,
    window: Option<String>,
    max_writes: Option<u32>,
    max_same_value: Option<u32>,
    max_changed_fraction: Option<f64>,
}

impl GuardDoc {
    /// The overrides, or the one sentence saying which key is wrong.
    pub(super) fn to_override(&self) -> Result<GuardOverride, String> {
        let window = match &self.window {
            None => None,
            Some(text) => match crate::config::parse_duration(text) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => return Err("guard `window` must be longer than zero".into()),
                Err(problem) => return Err(format!("guard `window` {problem}")),
            },
        };
        let positive = |key: &str, n: Option<u32>| match n {
            Some(0) => Err(format!("guard `{key}` must be at least 1")),
            other => Ok(other),
        };
        let fraction = match self.max_changed_fraction {
            None => None,
            Some(f) => {
                Some(check_fraction(f).map_err(|p| format!("guard `max_changed_fraction` {p}"))?)
            }
        };
        Ok(GuardOverride {
            enabled: self.enabled,
            window,
            max_writes: positive("max_writes", self.max_writes)?,
            max_same_value: positive("max_same_value", self.max_same_value)?,
            max_changed_fraction: fraction,
        })
    }
}
