//! TLS: the files of `[amqp.tls]` and `[redis.tls]`, and lists of URLs that must all use
//! TLS or all not.

use std::path::PathBuf;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::secret::SecretUrl;

/// Files for TLS (`[amqp.tls]`, `[redis.tls]`), all PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA that signed the server's certificate. For Redis it replaces the system's
    /// roots; for the broker, lapin's verifier trusts it besides the platform's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (with `key_file`), for servers that require mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// The contents of the files of a `TlsFiles`.
#[derive(Clone, Default)]
pub struct TlsPem {
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Checks the table on its own: a certificate needs its key, and every file must be
    /// readable.
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError(format!(
                "{key}.cert_file and {key}.key_file go together: set both for a client certificate, or neither"
            )));
        }
        self.read(key).map(|_| ())
    }

    /// Reads the files, naming the first that cannot be read.
    pub fn read(&self, key: &str) -> Result<TlsPem, ConfigError> {
        let read = |field: &str, path: &Option<PathBuf>| -> Result<Option<Vec<u8>>, ConfigError> {
            path.as_ref()
                .map(|path| {
                    std::fs::read(path).map_err(|e| {
                        ConfigError(format!(
                            "{key}.{field} {} cannot be read: {e}",
                            path.display()
                        ))
                    })
                })
                .transpose()
        };
        let certificates = |field: &str, pem: &Option<Vec<u8>>| -> Result<(), ConfigError> {
            let Some(pem) = pem else { return Ok(()) };
            let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
            match parsed {
                Ok(certs) if !certs.is_empty() => Ok(()),
                _ => Err(ConfigError(format!(
                    "{key}.{field} holds no PEM certificate that can be read"
                ))),
            }
        };
        let ca = read("ca_file", &self.ca_file)?;
        certificates("ca_file", &ca)?;
        let cert = read("cert_file", &self.cert_file)?;
        certificates("cert_file", &cert)?;
        let private_key = read("key_file", &self.key_file)?;
        if let Some(pem) = &private_key
            && PrivateKeyDer::from_pem_slice(pem).is_err()
        {
            return Err(ConfigError(format!(
                "{key}.key_file holds no PEM private key that can be read"
            )));
        }
        Ok(TlsPem {
            ca,
            identity: cert.zip(private_key),
        })
    }
}

/// Refuses a list whose URLs do not all use TLS or all not: a plaintext one would carry the
/// password in clear, and the clients cannot mix them.
pub(super) fn same_scheme(key: &str, urls: &[SecretUrl]) -> Result<(), ConfigError> {
    let secure = |url: &SecretUrl| {
        let scheme = url.expose().split("://").next().unwrap_or_default();
        matches!(scheme, "amqps" | "rediss" | "valkeys")
    };
    if urls.iter().any(secure) && !urls.iter().all(secure) {
        return Err(ConfigError(format!(
            "{key} mixes TLS and plaintext URLs; use amqps:// or rediss:// for all of them, or for none"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn a_tls_table_needs_a_tls_url_and_both_halves_of_a_client_certificate() {
        let err = |toml: &str| Config::from_toml_str(toml).unwrap_err().to_string();
        let dir = std::env::temp_dir().join(format!("gate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, made.cert.pem()).unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let (ca, broken, key) = (ca.display(), broken.display(), key.display());
        assert!(
            err(&format!(
                "[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\nca_file = \"{broken}\"\n"
            ))
            .contains("redis.tls.ca_file holds no PEM certificate"),
            "a CA file that is not PEM"
        );
        assert!(
            err(&format!(
                "[amqp]\nurl = \"amqps://h:5671\"\n[amqp.tls]\ncert_file = \"{ca}\"\nkey_file = \"{ca}\"\n"
            ))
            .contains("amqp.tls.key_file holds no PEM private key"),
            "a certificate given as the key"
        );
        Config::from_toml_str(&format!(
            "[amqp]\nurl = \"amqps://h:5671\"\n[amqp.tls]\ncert_file = \"{ca}\"\nkey_file = \"{key}\"\n"
        ))
        .unwrap();
        assert!(
            err(&format!("[redis.tls]\nca_file = \"{ca}\"\n")).contains("rediss://"),
            "a TLS table on a plaintext URL"
        );
        assert!(
            err(&format!("[amqp.tls]\nca_file = \"{ca}\"\n")).contains("amqps://"),
            "a TLS table on a plaintext URL"
        );
        assert!(
            err(&format!(
                "[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\ncert_file = \"{ca}\"\n"
            ))
            .contains("redis.tls.key_file"),
            "a certificate without its key"
        );
        assert!(
            err("[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\nca_file = \"/no/such/ca.pem\"\n")
                .contains("redis.tls.ca_file /no/such/ca.pem cannot be read"),
        );
        Config::from_toml_str(&format!(
            "[redis]\nurl = \"rediss://h:6380\"\n[redis.tls]\nca_file = \"{ca}\"\n"
        ))
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
