//! Credentials at rest: OAuth tokens Tether stores in PostgreSQL are encrypted with
//! XChaCha20-Poly1305 under `secrets.key`.
//!
//! `secrets.key` is one key or a list (each 32 bytes, base64): the first encrypts, every one
//! decrypts, so a key is rotated by putting the new one first and keeping the old one until the
//! next start has re-encrypted every row ([`seal_stored_credentials`] does that at start-up,
//! together with encrypting rows still stored in clear). A stored value is
//! `enc:v1:<key id>:<base64 of nonce ‖ ciphertext>`; the key id is the first 8 hex digits of the
//! key's SHA-256, and the row and column are the associated data, so a value copied into another
//! row or column does not decrypt. A database with encrypted rows and no key refuses to start
//! (see [`AtRestError`]): Tether cannot use those tokens, and silently re-seeding them from the
//! configuration would hide a lost key.
//!
//! Owns: the format and the keys. Called by: `cli` (start-up), the stored-token code of the
//! vendor transport (seal on write, open on read).

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

const PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 24;

/// Why stored credentials cannot be used. Messages never contain a key or a token.
#[derive(Debug, thiserror::Error)]
pub enum AtRestError {
    #[error("the database holds credentials encrypted at rest but no `secrets.key` is configured; configure the key they were encrypted with")]
    NoKey,
    #[error("a stored credential was encrypted with key {key_id}, which is not among the keys of `secrets.key`; add that key (after the current one) and restart")]
    UnknownKey { key_id: String },
    #[error("a stored credential does not decrypt with key {key_id}: it was altered or belongs to another row")]
    Corrupt { key_id: String },
    #[error("a stored credential is not in Tether's encrypted format")]
    Malformed,
    #[error("database error while encrypting stored credentials: {0}")]
    Database(#[from] sqlx::Error),
}

struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The configured keys (the first encrypts).
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

/// Decodes one configured key: base64 of exactly 32 bytes. The error says what is wrong, never
/// what the value is.
pub fn decode_key(key: &SecretString) -> Result<SecretBox<[u8; 32]>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| "is not base64 (make one with `openssl rand -base64 32`)".to_owned())?;
    let array: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        format!(
            "decodes to {} bytes; a key is 32 random bytes (`openssl rand -base64 32`)",
            bytes.len()
        )
    })?;
    Ok(SecretBox::new(Box::new(array)))
}

impl Keyring {
    /// The keyring of `secrets.key`, or `None` when no key is configured. Keys are validated by
    /// the configuration loader already.
    pub fn from_config(keys: &[SecretString]) -> Option<Keyring> {
        let keys: Vec<Key> = keys
            .iter()
            .filter_map(|k| decode_key(k).ok())
            .map(|k| {
                let secret = k.expose_secret();
                Key {
                    id: hex::encode(&Sha256::digest(secret)[..4]),
                    cipher: XChaCha20Poly1305::new(secret.into()),
                }
            })
            .collect();
        (!keys.is_empty()).then_some(Keyring { keys })
    }

    /// Encrypts `plain` for the place named by `context` (e.g. `oauth_tokens/exactonline/123/refresh_token`).
    pub fn seal(&self, plain: &str, context: &str) -> String {
        let key = &self.keys[0];
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length Tether stores");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!(
            "{PREFIX}{}:{}",
            key.id,
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(out)
        )
    }

    /// Decrypts a value [`Keyring::seal`] made for the same `context`.
    pub fn open(&self, stored: &str, context: &str) -> Result<SecretString, AtRestError> {
        let rest = stored.strip_prefix(PREFIX).ok_or(AtRestError::Malformed)?;
        let (key_id, data) = rest.split_once(':').ok_or(AtRestError::Malformed)?;
        let key =
            self.keys
                .iter()
                .find(|k| k.id == key_id)
                .ok_or_else(|| AtRestError::UnknownKey {
                    key_id: key_id.to_owned(),
                })?;
        let data = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(data)
            .map_err(|_| AtRestError::Malformed)?;
        if data.len() < NONCE_LEN {
            return Err(AtRestError::Malformed);
        }
        let (nonce, sealed) = data.split_at(NONCE_LEN);
        let corrupt = || AtRestError::Corrupt {
            key_id: key_id.to_owned(),
        };
        let plain = key
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| corrupt())
    }

    /// Whether `stored` is sealed with the key that encrypts now (nothing to re-encrypt).
    fn is_current(&self, stored: &str) -> bool {
        stored
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(id, _)| id == self.keys[0].id)
    }
}

/// Whether a stored value is in the encrypted format (rather than clear text of an older Tether).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// The associated data of one stored token: its table, row and column.
pub fn token_context(system: &str, account: &str, column: &str) -> String {
    format!("oauth_tokens/{system}/{account}/{column}")
}

/// Reads one stored token column. Clear text passes (a Tether without `secrets.key`, or a row an
/// older replica wrote during a rolling upgrade; the next write or start seals it); a sealed value
/// needs the keyring.
pub fn open_token(
    keyring: Option<&Keyring>,
    stored: &str,
    context: &str,
) -> Result<SecretString, AtRestError> {
    match keyring {
        _ if !is_sealed(stored) => Ok(SecretString::from(stored.to_owned())),
        Some(k) => k.open(stored, context),
        None => Err(AtRestError::NoKey),
    }
}

/// Writes one token column: sealed when a keyring is configured, else as it is.
pub fn seal_token(keyring: Option<&Keyring>, plain: &str, context: &str) -> String {
    match keyring {
        Some(k) => k.seal(plain, context),
        None => plain.to_owned(),
    }
}

/// What start-up did to the stored credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sealed {
    /// Token values that were in clear text or under an older key and are now under the first key.
    pub values: u64,
}

/// At start-up, before anything reads a token: with a keyring, encrypts every token stored in
/// clear and re-encrypts those under an older key (all in one transaction, rows locked); without
/// one, refuses if any token is encrypted. A value that no key opens stops the start.
pub async fn seal_stored_credentials(
    pool: &PgPool,
    keyring: Option<&Keyring>,
) -> Result<Sealed, AtRestError> {
    let Some(keyring) = keyring else {
        let sealed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM oauth_tokens WHERE refresh_token LIKE 'enc:%' \
             OR access_token LIKE 'enc:%')",
        )
        .fetch_one(pool)
        .await?;
        return if sealed {
            Err(AtRestError::NoKey)
        } else {
            Ok(Sealed::default())
        };
    };
    let mut tx = pool.begin().await?;
    let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT system, account, access_token, refresh_token FROM oauth_tokens FOR UPDATE",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Sealed::default();
    for (system, account, access, refresh) in rows {
        let mut reseal = |stored: &str, column: &str| -> Result<Option<String>, AtRestError> {
            if keyring.is_current(stored) {
                return Ok(None);
            }
            let context = token_context(&system, &account, column);
            let plain = if is_sealed(stored) {
                keyring.open(stored, &context)?
            } else {
                SecretString::from(stored.to_owned())
            };
            done.values += 1;
            Ok(Some(keyring.seal(plain.expose_secret(), &context)))
        };
        let new_refresh = reseal(&refresh, "refresh_token")?;
        let new_access = match &access {
            Some(a) => reseal(a, "access_token")?,
            None => None,
        };
        if new_refresh.is_some() || new_access.is_some() {
            sqlx::query(
                "UPDATE oauth_tokens SET refresh_token = COALESCE($3, refresh_token), \
                 access_token = COALESCE($4, access_token) WHERE system = $1 AND account = $2",
            )
            .bind(&system)
            .bind(&account)
            .bind(new_refresh)
            .bind(new_access)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretString {
        SecretString::from(base64::engine::general_purpose::STANDARD.encode([byte; 32]))
    }

    #[test]
    fn sealed_values_open_only_in_their_context_and_under_a_configured_key() {
        let ring = Keyring::from_config(&[key(1)]).unwrap();
        let sealed = ring.seal("refresh-123", "oauth_tokens/exactonline/1/refresh_token");
        assert!(is_sealed(&sealed) && !sealed.contains("refresh-123"));
        let opened = ring
            .open(&sealed, "oauth_tokens/exactonline/1/refresh_token")
            .unwrap();
        assert_eq!(opened.expose_secret(), "refresh-123");
        // Moved to another row: refused.
        assert!(matches!(
            ring.open(&sealed, "oauth_tokens/exactonline/2/refresh_token"),
            Err(AtRestError::Corrupt { .. })
        ));
        // Another keyring without that key: named by id, never by value.
        let other = Keyring::from_config(&[key(2)]).unwrap();
        let e = other.open(&sealed, "oauth_tokens/exactonline/1/refresh_token");
        assert!(matches!(e, Err(AtRestError::UnknownKey { .. })), "{e:?}");
        // Two seals of one value differ (random nonce).
        assert_ne!(
            sealed,
            ring.seal("refresh-123", "oauth_tokens/exactonline/1/refresh_token")
        );
    }

    #[test]
    fn the_first_key_encrypts_and_every_key_decrypts() {
        let old = Keyring::from_config(&[key(1)]).unwrap();
        let sealed = old.seal("t", "c");
        let rotated = Keyring::from_config(&[key(2), key(1)]).unwrap();
        assert_eq!(rotated.open(&sealed, "c").unwrap().expose_secret(), "t");
        assert!(!rotated.is_current(&sealed));
        assert!(rotated.is_current(&rotated.seal("t", "c")));
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64_and_never_print() {
        assert!(decode_key(&SecretString::from("not base64!")).is_err());
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 16]);
        let e = decode_key(&SecretString::from(short.clone())).unwrap_err();
        assert!(e.contains("16 bytes") && !e.contains(&short));
        let ring = Keyring::from_config(&[key(7)]).unwrap();
        assert!(!format!("{ring:?}").contains(key(7).expose_secret()));
    }

    #[test]
    fn without_a_keyring_clear_text_passes_and_sealed_values_refuse() {
        assert_eq!(
            open_token(None, "clear", "c").unwrap().expose_secret(),
            "clear"
        );
        let sealed = Keyring::from_config(&[key(1)]).unwrap().seal("x", "c");
        assert!(matches!(
            open_token(None, &sealed, "c"),
            Err(AtRestError::NoKey)
        ));
    }
}
