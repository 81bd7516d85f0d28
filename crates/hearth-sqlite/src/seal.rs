//! Optional encryption of replica objects: zstd-compressed, then age-encrypted to the replica's recipients.
//!
//! An encrypted replica keeps Litestream's key layout, but its objects are age files, so Litestream cannot
//! read it (docs/sqlite.md says so). Compression only happens here because plain LTX files must stay in the
//! format Litestream reads, which compresses pages with LZ4; inside an encrypted object the format is ours.

use std::io::{Read, Write};
use std::str::FromStr;

/// The first bytes of every age file.
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";

/// zstd level: fast, and LTX pages are already LZ4-compressed, so higher levels buy little.
const ZSTD_LEVEL: i32 = 3;

/// Why sealing or opening an object failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("age recipient `{0}` is not an X25519 recipient (age1…)")]
    BadRecipient(String),
    #[error("an age identity in the configuration is not an X25519 identity (AGE-SECRET-KEY-1…)")]
    BadIdentity,
    #[error(
        "the replica object is encrypted with age, but no age identity is configured to decrypt it (age: identities:)"
    )]
    NoIdentity,
    #[error("decrypt the replica object: {0}")]
    Decrypt(String),
    #[error("encrypt the replica object: {0}")]
    Encrypt(String),
    #[error("decompress the replica object: {0}")]
    Decompress(std::io::Error),
}

/// How a replica's objects are sealed: plain, or compressed and encrypted.
#[derive(Clone, Default)]
pub struct Sealer {
    recipients: Vec<age::x25519::Recipient>,
    identities: Vec<age::x25519::Identity>,
}

impl std::fmt::Debug for Sealer {
    // Hand-written so identities never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("recipients", &self.recipients.len())
            .field("identities", &self.identities.len())
            .finish()
    }
}

impl Sealer {
    /// A sealer from configured age recipients (to write) and identities (to read).
    pub fn new(recipients: &[String], identities: &[String]) -> Result<Sealer, SealError> {
        let recipients = recipients
            .iter()
            .map(|r| {
                age::x25519::Recipient::from_str(r.trim())
                    .map_err(|_| SealError::BadRecipient(r.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identities = identities
            .iter()
            .map(|i| age::x25519::Identity::from_str(i.trim()).map_err(|_| SealError::BadIdentity))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Sealer {
            recipients,
            identities,
        })
    }

    /// Whether objects written through this sealer are encrypted.
    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// Turns an LTX file into the object to store.
    pub fn seal(&self, plain: Vec<u8>) -> Result<Vec<u8>, SealError> {
        if !self.encrypts() {
            return Ok(plain);
        }
        let compressed = zstd::bulk::compress(&plain, ZSTD_LEVEL)
            .map_err(|e| SealError::Encrypt(e.to_string()))?;
        let encryptor = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(|e| SealError::Encrypt(e.to_string()))?;
        let mut out = Vec::with_capacity(compressed.len() + 256);
        let mut writer = encryptor
            .wrap_output(&mut out)
            .map_err(|e| SealError::Encrypt(e.to_string()))?;
        writer
            .write_all(&compressed)
            .map_err(|e| SealError::Encrypt(e.to_string()))?;
        writer
            .finish()
            .map_err(|e| SealError::Encrypt(e.to_string()))?;
        Ok(out)
    }

    /// Turns a stored object back into an LTX file; plain objects pass through, whatever the configuration.
    pub fn open(&self, stored: &[u8]) -> Result<Vec<u8>, SealError> {
        if !stored.starts_with(AGE_MAGIC) {
            return Ok(stored.to_vec());
        }
        if self.identities.is_empty() {
            return Err(SealError::NoIdentity);
        }
        let decryptor =
            age::Decryptor::new(stored).map_err(|e| SealError::Decrypt(e.to_string()))?;
        let mut reader = decryptor
            .decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| SealError::Decrypt(e.to_string()))?;
        let mut compressed = Vec::new();
        reader
            .read_to_end(&mut compressed)
            .map_err(|e| SealError::Decrypt(e.to_string()))?;
        let mut plain = Vec::new();
        zstd::stream::copy_decode(&compressed[..], &mut plain).map_err(SealError::Decompress)?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let key = age::x25519::Identity::generate();
        let recipient = key.to_public().to_string();
        let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_string();
        let sealer = Sealer::new(
            std::slice::from_ref(&recipient),
            std::slice::from_ref(&identity),
        )
        .unwrap();
        let plain = b"LTX1 and some pages".repeat(100);
        let sealed = sealer.seal(plain.clone()).unwrap();
        assert!(sealed.starts_with(AGE_MAGIC));
        assert!(
            !sealed.windows(4).any(|w| w == b"LTX1"),
            "the LTX content must not be readable"
        );
        assert_eq!(sealer.open(&sealed).unwrap(), plain);

        // Without an identity: a clear error, not garbage.
        let writer_only = Sealer::new(&[recipient], &[]).unwrap();
        assert!(matches!(
            writer_only.open(&sealed),
            Err(SealError::NoIdentity)
        ));
        // With the wrong identity.
        let other = age::x25519::Identity::generate();
        let other = age::secrecy::ExposeSecret::expose_secret(&other.to_string()).to_string();
        let wrong = Sealer::new(&[], &[other]).unwrap();
        assert!(matches!(wrong.open(&sealed), Err(SealError::Decrypt(_))));
        // Plain objects pass through.
        assert_eq!(Sealer::default().open(&plain).unwrap(), plain);
        assert!(matches!(
            Sealer::new(&["age1nope".into()], &[]),
            Err(SealError::BadRecipient(_))
        ));
    }
}
