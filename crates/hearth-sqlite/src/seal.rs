//! Optional encryption of replica objects: zstd-compressed, then age-encrypted to the replica's recipients.
//!
//! An encrypted replica keeps Litestream's key layout, but its objects are age files, so Litestream cannot
//! read it (docs/sqlite.md says so). Compression only happens here because plain LTX files must stay in the
//! format Litestream reads, which compresses pages with LZ4; inside an encrypted object the format is ours.
//!
//! Objects are sealed and opened as streams ([`Sealer::seal_to`], [`Sealer::open_reader`]), so memory does not
//! grow with the database: age's STREAM format is made for that (64 KiB chunks), and zstd's streaming frame is
//! read by the same decoders as a frame compressed in one call.

use std::io::{self, Cursor, Read, Write};
use std::str::FromStr;

/// The first bytes of every age file.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1";

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
        self.seal_to(&plain[..], Vec::with_capacity(plain.len() / 2 + 256))
    }

    /// Seals the LTX file read from `plain` onto `out` as a stream, with memory bounded by zstd's window and
    /// one age chunk, and returns `out`. Copies it unchanged when the replica is not encrypted.
    pub fn seal_to<R: Read, W: Write>(&self, mut plain: R, mut out: W) -> Result<W, SealError> {
        let fail = |e: io::Error| SealError::Encrypt(e.to_string());
        if !self.encrypts() {
            io::copy(&mut plain, &mut out).map_err(fail)?;
            out.flush().map_err(fail)?;
            return Ok(out);
        }
        let encryptor = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(|e| SealError::Encrypt(e.to_string()))?;
        let age_writer = encryptor.wrap_output(out).map_err(fail)?;
        let mut zstd_writer =
            zstd::stream::write::Encoder::new(age_writer, ZSTD_LEVEL).map_err(fail)?;
        io::copy(&mut plain, &mut zstd_writer).map_err(fail)?;
        let age_writer = zstd_writer.finish().map_err(fail)?;
        let mut out = age_writer.finish().map_err(fail)?;
        out.flush().map_err(fail)?;
        Ok(out)
    }

    /// A reader of the LTX file inside the stored object read from `stored`: decrypted and decompressed as it
    /// is read when the object is sealed, passed through when it is plain (whatever the configuration).
    /// Errors found while reading (a damaged or truncated object) come out of `read` as I/O errors whose
    /// message says they are about decryption.
    pub fn open_reader<'a, R: Read + Send + 'a>(
        &self,
        mut stored: R,
    ) -> Result<Box<dyn Read + Send + 'a>, SealError> {
        // Read just enough to tell an age file from a plain one, then put those bytes back in front.
        let mut magic = Vec::with_capacity(AGE_MAGIC.len());
        (&mut stored)
            .take(AGE_MAGIC.len() as u64)
            .read_to_end(&mut magic)
            .map_err(|e| SealError::Decrypt(e.to_string()))?;
        let sealed = magic == AGE_MAGIC;
        let whole = Cursor::new(magic).chain(stored);
        if !sealed {
            return Ok(Box::new(whole));
        }
        if self.identities.is_empty() {
            return Err(SealError::NoIdentity);
        }
        let decryptor =
            age::Decryptor::new(whole).map_err(|e| SealError::Decrypt(e.to_string()))?;
        let decrypted = decryptor
            .decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| SealError::Decrypt(e.to_string()))?;
        let plain = zstd::stream::read::Decoder::new(decrypted).map_err(SealError::Decompress)?;
        Ok(Box::new(Labelled(plain)))
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

/// Says in a read error's message that it came from opening a sealed object, so that a damaged object is not
/// reported as a bare I/O error.
struct Labelled<R>(R);

impl<R: Read> Read for Labelled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("decrypt and decompress the replica object: {e}"),
            )
        })
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

    fn keypair() -> Sealer {
        let key = age::x25519::Identity::generate();
        let recipient = key.to_public().to_string();
        let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_string();
        Sealer::new(&[recipient], &[identity]).unwrap()
    }

    /// Bytes zstd cannot shrink (xorshift), so that sealed objects span several age chunks.
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn read_all(mut r: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn streams_round_trip_with_the_whole_object_functions() {
        let sealer = keypair();
        // Sizes around age's 64 KiB chunk and zstd's 128 KiB block, compressible and not.
        let random = noise(300_000);
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"LTX1".to_vec(),
            b"LTX1 page ".repeat(20_000),
            random[..65_536].to_vec(),
            random[..65_537].to_vec(),
            random.clone(),
        ];
        for plain in cases {
            let len = plain.len();
            let streamed = sealer.seal_to(&plain[..], Vec::new()).unwrap();
            assert!(streamed.starts_with(AGE_MAGIC), "{len}");
            // Streamed output opens with the whole-object `open` (what restore uses), and `seal` output
            // opens with the streaming reader: one format.
            assert_eq!(sealer.open(&streamed).unwrap(), plain, "{len}");
            let whole = sealer.seal(plain.clone()).unwrap();
            let reader = sealer.open_reader(&whole[..]).unwrap();
            assert_eq!(read_all(reader).unwrap(), plain, "{len}");
            // Plain objects pass through both ways.
            let plain_sealer = Sealer::default();
            assert_eq!(plain_sealer.seal_to(&plain[..], Vec::new()).unwrap(), plain);
            let reader = sealer.open_reader(&plain[..]).unwrap();
            assert_eq!(read_all(reader).unwrap(), plain, "{len}");
        }
    }

    #[test]
    fn damaged_or_unreadable_streams_are_errors() {
        let sealer = keypair();
        let plain = noise(200_000);
        let sealed = sealer.seal_to(&plain[..], Vec::new()).unwrap();
        assert!(sealed.len() > 200_000);
        // Truncated: an error while reading, never a short file taken as whole.
        let cut = &sealed[..sealed.len() - 100];
        let err = read_all(sealer.open_reader(cut).unwrap()).unwrap_err();
        assert!(err.to_string().contains("decrypt"), "{err}");
        // One flipped byte in the payload fails authentication.
        let mut flipped = sealed.clone();
        let at = flipped.len() - 50;
        flipped[at] ^= 1;
        assert!(read_all(sealer.open_reader(&flipped[..]).unwrap()).is_err());
        // No identity, or the wrong one: refused before any byte is read.
        let writer_only = Sealer {
            identities: Vec::new(),
            ..sealer.clone()
        };
        assert!(matches!(
            writer_only.open_reader(&sealed[..]),
            Err(SealError::NoIdentity)
        ));
        assert!(matches!(
            keypair().open_reader(&sealed[..]),
            Err(SealError::Decrypt(_))
        ));
    }
}
