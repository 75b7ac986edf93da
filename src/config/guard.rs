//! `[guard]`: the thresholds past which a flow pauses itself and holds its writes (docs/guard.md).

use super::{ConfigError, Raw, Source};
use crate::guard::settings::{check_fraction, GuardSettings};

pub(super) fn load(s: &mut Source) -> Result<GuardSettings, ConfigError> {
    let default = GuardSettings::default();
    let window = s.duration("guard.window")?.unwrap_or(default.window);
    if window.is_zero() {
        return Err(ConfigError(
            "configuration key `guard.window` must be longer than zero.".into(),
        ));
    }
    let count = |s: &mut Source, key: &str, default: u32| -> Result<u32, ConfigError> {
        Ok(s.integer(key, 1, i64::from(u32::MAX))?
            .map_or(default, |n| n as u32))
    };
    Ok(GuardSettings {
        enabled: s.bool("guard.enabled")?.unwrap_or(default.enabled),
        window,
        max_writes: count(s, "guard.max_writes", default.max_writes)?,
        max_same_value: count(s, "guard.max_same_value", default.max_same_value)?,
        max_changed_fraction: fraction(s, "guard.max_changed_fraction")?
            .unwrap_or(default.max_changed_fraction),
    })
}

/// A share above 0 and at most 1: a TOML float (or integer 1), or a number in a variable.
fn fraction(s: &mut Source, key: &str) -> Result<Option<f64>, ConfigError> {
    let (value, origin) = match s.take(key) {
        None => return Ok(None),
        Some((Raw::Toml(toml::Value::Float(f)), origin)) => (f, origin),
        Some((Raw::Toml(toml::Value::Integer(i)), origin)) => (i as f64, origin),
        Some((Raw::Env(text), origin)) => match text.trim().parse::<f64>() {
            Ok(f) => (f, origin),
            Err(_) => {
                let problem = format!("is {text:?}, which is not a number");
                return Err(ConfigError::at(key, &origin, problem));
            }
        },
        Some((Raw::Toml(other), origin)) => {
            let problem = format!("must be a number such as 0.2, not {}", other.type_str());
            return Err(ConfigError::at(key, &origin, problem));
        }
    };
    check_fraction(value)
        .map(Some)
        .map_err(|problem| ConfigError::at(key, &origin, problem))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    fn loaded(toml: &str) -> Result<GuardSettings, ConfigError> {
        let mut s = Source::empty();
        s.add_toml(toml, Path::new("t.toml")).unwrap();
        load(&mut s)
    }

    #[test]
    fn defaults_and_every_key() {
        assert_eq!(loaded("").unwrap(), GuardSettings::default());
        let set = loaded(
            "[guard]\nwindow = \"1m\"\nmax_writes = 10\nmax_same_value = 3\n\
             max_changed_fraction = 0.5\nenabled = false\n",
        )
        .unwrap();
        assert_eq!(
            set,
            GuardSettings {
                enabled: false,
                window: Duration::from_secs(60),
                max_writes: 10,
                max_same_value: 3,
                max_changed_fraction: 0.5,
            }
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        for (toml, key) in [
            (
                "[guard]\nmax_changed_fraction = 1.5\n",
                "guard.max_changed_fraction",
            ),
            (
                "[guard]\nmax_changed_fraction = \"x\"\n",
                "guard.max_changed_fraction",
            ),
            ("[guard]\nmax_writes = 0\n", "guard.max_writes"),
            ("[guard]\nwindow = \"0s\"\n", "guard.window"),
        ] {
            let e = loaded(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
