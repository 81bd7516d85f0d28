//! Node identities for the volume link: a key pair in a self-signed certificate made by
//! `hearth volume keygen`, named by a fingerprint that peers pin, and the rustls configurations
//! that accept exactly the pinned peers on both sides (mutual TLS 1.3).
//!
//! Why pinning instead of a certificate authority: our users have three to ten machines and no
//! PKI; copying one short line (the peer id) into the other side's configuration is the whole
//! set-up, as with SSH host keys or Syncthing device ids. The certificate is only a carrier for
//! the public key: names and validity dates are not checked, the fingerprint is.

use std::fmt;
use std::fs;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::NetError;
use crate::durable::{Existing, write_atomic};

/// File name of the private key inside an identity directory.
pub const KEY_FILE: &str = "volume.key";
/// File name of the certificate inside an identity directory.
pub const CERT_FILE: &str = "volume.crt";

/// The prefix of a printed peer id; it names the scheme (BLAKE3 of the certificate, version 1) so
/// that a later scheme can be told apart.
const ID_PREFIX: &str = "hv1-";

/// A node's public identity: the BLAKE3 hash of its certificate (DER). Printed as `hv1-` and 64
/// hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    /// The id of a certificate.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Self {
        PeerId(*blake3::hash(cert.as_ref()).as_bytes())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{ID_PREFIX}{}",
            blake3::Hash::from_bytes(self.0).to_hex()
        )
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::BadPeerId {
            given: s.to_owned(),
        };
        let hex = s.trim().strip_prefix(ID_PREFIX).ok_or_else(bad)?;
        blake3::Hash::from_hex(hex)
            .map(|h| PeerId(*h.as_bytes()))
            .map_err(|_| bad())
    }
}

/// This node's key pair and certificate.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    id: PeerId,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            id: self.id,
        }
    }
}

impl Identity {
    /// Makes a new Ed25519 key pair in a self-signed certificate, in memory.
    pub fn generate() -> Result<Self, NetError> {
        let (cert_pem, key_pem) = generate_pem()?;
        Self::from_pem(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            Path::new("<generated>"),
        )
    }

    /// Makes a new identity and writes it into `dir` (created if missing) as [`KEY_FILE`]
    /// (mode 0600) and [`CERT_FILE`]. An existing key is never replaced: peers have pinned its
    /// id, and overwriting it would cut this node off (and lose the key).
    pub fn create(dir: &Path) -> Result<Self, NetError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        if key_path.exists() || cert_path.exists() {
            return Err(NetError::IdentityExists { dir: dir.into() });
        }
        fs::create_dir_all(dir).map_err(|e| NetError::io("creating", dir, e))?;
        let (cert_pem, key_pem) = generate_pem()?;
        // The certificate goes first: a key without a certificate would block a second keygen
        // without being usable, while a certificate alone is harmless and is overwritten.
        write_new(&cert_path, cert_pem.as_bytes(), 0o644)?;
        write_new(&key_path, key_pem.as_bytes(), 0o600)?;
        Self::load(dir)
    }

    /// Reads the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Self, NetError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let cert = fs::read(&cert_path).map_err(|e| NetError::io("reading", &cert_path, e))?;
        let key = fs::read(&key_path).map_err(|e| NetError::io("reading", &key_path, e))?;
        // Like ssh with its keys: a private key others can read is refused, not used.
        let mode = fs::metadata(&key_path)
            .map_err(|e| NetError::io("inspecting", &key_path, e))?
            .permissions();
        if std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077 != 0 {
            return Err(NetError::BadIdentity {
                dir: dir.into(),
                reason: format!(
                    "{} can be read by other users; run `chmod 600 {}`",
                    key_path.display(),
                    key_path.display()
                ),
            });
        }
        Self::from_pem(&cert, &key, dir)
    }

    fn from_pem(cert: &[u8], key: &[u8], dir: &Path) -> Result<Self, NetError> {
        let bad = |what: &str, e: &dyn fmt::Display| NetError::BadIdentity {
            dir: dir.into(),
            reason: format!("{what}: {e}"),
        };
        let cert = CertificateDer::from_pem_slice(cert).map_err(|e| bad("certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("private key", &e))?;
        let id = PeerId::of_cert(&cert);
        Ok(Identity { cert, key, id })
    }

    /// This node's id, to be given to its peers.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The server side of the link: accepts clients whose id is in `allowed`, and only them.
    pub fn server_config(
        &self,
        allowed: Vec<PeerId>,
    ) -> Result<Arc<rustls::ServerConfig>, NetError> {
        let provider = provider();
        let verifier = PinnedClients {
            allowed,
            algorithms: provider.signature_verification_algorithms,
        };
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(NetError::Tls)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(NetError::Tls)?;
        Ok(Arc::new(config))
    }

    /// The client side of the link: talks only to a server whose id is `expected`.
    pub fn client_config(&self, expected: PeerId) -> Result<Arc<rustls::ClientConfig>, NetError> {
        let provider = provider();
        let verifier = PinnedServer {
            expected,
            algorithms: provider.signature_verification_algorithms,
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(NetError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(NetError::Tls)?;
        Ok(Arc::new(config))
    }
}

/// The server name a client presents. Servers are recognised by their pinned id, not by name, so
/// every client uses the same fixed name.
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from("hearth")
            .unwrap_or_else(|_| unreachable!("a valid literal DNS name"))
            .to_owned(),
    )
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn generate_pem() -> Result<(String, String), NetError> {
    let gen_err = |e: rcgen::Error| NetError::KeyGeneration(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(gen_err)?;
    let params = rcgen::CertificateParams::new(vec!["hearth".to_owned()]).map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a new file durably; never replaces an existing one.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NetError> {
    write_atomic(path, bytes, mode, Existing::Keep).map_err(|e| NetError::io("writing", path, e))
}

/// Accepts a client certificate whose fingerprint is in the allowed list. The handshake
/// signatures are still checked with the certificate's key, so holding the certificate alone
/// (it is not secret) proves nothing.
#[derive(Debug)]
struct PinnedClients {
    allowed: Vec<PeerId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = PeerId::of_cert(end_entity);
        if self.allowed.contains(&id) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(peer = %id, "refused a client whose key is not allowed");
            Err(rustls::Error::General(format!(
                "client key {id} is not allowed on this standby"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts exactly one server certificate, by fingerprint.
#[derive(Debug)]
struct PinnedServer {
    expected: PeerId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = PeerId::of_cert(end_entity);
        if id == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the standby's key is {id}, expected {}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_print_and_parse() {
        let id = PeerId([7; 32]);
        let text = id.to_string();
        assert!(text.starts_with("hv1-"));
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        for bad in ["", "hv1-", "hv2-0707", "0707", "hv1-zz"] {
            assert!(bad.parse::<PeerId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn keygen_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::create(dir.path()).unwrap();
        let again = Identity::load(dir.path()).unwrap();
        assert_eq!(first.id(), again.id());
        let err = Identity::create(dir.path()).unwrap_err();
        assert!(matches!(err, NetError::IdentityExists { .. }), "{err}");
        assert_eq!(Identity::load(dir.path()).unwrap().id(), first.id());
        let mode = fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }
}
