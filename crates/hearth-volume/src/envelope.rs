//! The envelope every binary file of this crate is stored in (manifests, applied-file stamps, the
//! capture cache): 8 magic bytes naming the kind of file, a format version (u16, little-endian), the
//! body, and the BLAKE3 hash of the body, so a torn or foreign file is recognised, never misread.

/// Why an envelope could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EnvelopeError {
    /// Shorter than an empty envelope.
    TooShort,
    /// The magic bytes are not the expected ones.
    WrongMagic,
    /// Another format version (the one found).
    Version(u16),
    /// The body does not hash to the recorded hash.
    Checksum,
}

/// Wraps `body`.
pub(crate) fn seal(magic: &[u8; 8], version: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 42);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(blake3::hash(body).as_bytes());
    out
}

/// Checks magic, version and hash, and returns the body.
pub(crate) fn open<'a>(
    magic: &[u8; 8],
    version: u16,
    bytes: &'a [u8],
) -> Result<&'a [u8], EnvelopeError> {
    if bytes.len() < magic.len() + 2 + 32 {
        return Err(EnvelopeError::TooShort);
    }
    let rest = bytes
        .strip_prefix(magic.as_slice())
        .ok_or(EnvelopeError::WrongMagic)?;
    let (found, rest) = rest.split_at(2);
    let found = u16::from_le_bytes([found[0], found[1]]);
    if found != version {
        return Err(EnvelopeError::Version(found));
    }
    let (body, sum) = rest.split_at(rest.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(EnvelopeError::Checksum);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let sealed = seal(b"TESTTEST", 3, b"body");
        assert_eq!(open(b"TESTTEST", 3, &sealed), Ok(&b"body"[..]));
        assert_eq!(
            open(b"TESTTEST", 3, &sealed[..10]),
            Err(EnvelopeError::TooShort)
        );
        assert_eq!(
            open(b"OTHEROTH", 3, &sealed),
            Err(EnvelopeError::WrongMagic)
        );
        assert_eq!(
            open(b"TESTTEST", 4, &sealed),
            Err(EnvelopeError::Version(3))
        );
        let mut bad = sealed.clone();
        bad[11] ^= 1;
        assert_eq!(open(b"TESTTEST", 3, &bad), Err(EnvelopeError::Checksum));
    }
}
