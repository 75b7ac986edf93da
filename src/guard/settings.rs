//! The guard's thresholds: `[guard]` in the configuration, overridden per flow by the registry
//! overlay's `[dataflow.guard]` (docs/guard.md).

use std::time::Duration;

/// The thresholds one flow runs under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardSettings {
    /// `enabled`: off, the flow's writes are neither counted nor held.
    pub enabled: bool,
    /// `window`: how far back writes are counted.
    pub window: Duration,
    /// `max_writes`: writes of the flow (both directions, creates included) within the window.
    pub max_writes: u32,
    /// `max_same_value`: records given the same new value of one property within the window.
    pub max_same_value: u32,
    /// `max_changed_fraction`: share of the flow's linked records changed within the window.
    pub max_changed_fraction: f64,
}

/// `max_changed_fraction` applies once a flow has at least this many active links: a share of a
/// handful of records says nothing about a mass change.
pub const FRACTION_APPLIES_FROM_LINKS: i64 = 100;

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            enabled: true,
            window: Duration::from_secs(5 * 60),
            max_writes: 1000,
            max_same_value: 50,
            max_changed_fraction: 0.2,
        }
    }
}

/// A flow's overrides from the registry overlay: each key set replaces the configuration's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GuardOverride {
    pub enabled: Option<bool>,
    pub window: Option<Duration>,
    pub max_writes: Option<u32>,
    pub max_same_value: Option<u32>,
    pub max_changed_fraction: Option<f64>,
}

impl GuardOverride {
    /// The configuration's settings with this flow's overrides applied.
    pub fn over(&self, base: GuardSettings) -> GuardSettings {
        GuardSettings {
            enabled: self.enabled.unwrap_or(base.enabled),
            window: self.window.unwrap_or(base.window),
            max_writes: self.max_writes.unwrap_or(base.max_writes),
            max_same_value: self.max_same_value.unwrap_or(base.max_same_value),
            max_changed_fraction: self
                .max_changed_fraction
                .unwrap_or(base.max_changed_fraction),
        }
    }

    /// True when no key is set.
    pub fn is_empty(&self) -> bool {
        *self == GuardOverride::default()
    }
}

/// Why a fraction is not a share between 0 (exclusive) and 1 (inclusive).
pub fn check_fraction(value: f64) -> Result<f64, String> {
    if value.is_finite() && value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(format!(
            "is {value}, but must be a share above 0 and at most 1 (0.2 is 20%)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_replaces_only_the_keys_it_sets() {
        let flow = GuardOverride {
            max_writes: Some(5),
            ..GuardOverride::default()
        };
        let settings = flow.over(GuardSettings::default());
        assert_eq!(settings.max_writes, 5);
        assert_eq!(settings.max_same_value, 50);
        assert_eq!(settings.window, Duration::from_secs(300));
        assert!(GuardOverride::default().is_empty() && !flow.is_empty());
    }

    #[test]
    fn a_fraction_is_a_share() {
        assert_eq!(check_fraction(0.2), Ok(0.2));
        assert_eq!(check_fraction(1.0), Ok(1.0));
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(check_fraction(bad).is_err(), "{bad}");
        }
    }
}
