//! Key files: the backup key (put-only) and the restore key (everything).
//!
//! A **backup key file** holds the META identity, the dedup key, the chunker
//! seed and the DATA *recipients*: enough to back up, deduplicate, list
//! snapshots and prune, and not enough to decrypt any blob. A **restore key
//! file** adds the DATA identity. Both are JSON, written with mode 0600, and
//! refused when group or others can read them. Escrow copies of the restore
//! key live in the repository under `keys/`, age-encrypted to administrators'
//! own recipients or to a passphrase.

use crate::error::LabError;
use crate::repo::{crypto, Id};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What a key file allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyRole {
    /// Back up, deduplicate, list, check and prune; no blob decryption.
    Backup,
    /// Everything, including restore and `check --read-data`.
    Restore,
}

/// On-disk form of a key file (format version 1).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KeyFileV1 {
    labctl_key: u32,
    role: KeyRole,
    repo_id: String,
    meta_identity: String,
    dedup_key: String,
    chunker_seed: String,
    data_recipients: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_identity: Option<String>,
    /// BLAKE3 of the repository's `config` object as `repo init` wrote it
    /// (absent in key files made before labctl pinned the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config_hash: Option<String>,
}

/// Loaded key material. Debug output never shows secrets.
#[derive(Clone)]
pub struct Keys {
    pub role: KeyRole,
    pub repo_id: String,
    pub meta_identity: age::x25519::Identity,
    pub dedup_key: [u8; 32],
    pub chunker_seed: [u8; 32],
    pub data_recipients: Vec<age::x25519::Recipient>,
    pub data_identity: Option<crypto::DataIdentity>,
    /// The hash of the `config` object this key belongs to: a config changed
    /// in storage afterwards is refused on open (a storage attacker cannot
    /// update the copy in the key file). `None` for older key files.
    pub config_hash: Option<Id>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Keys {{ role: {:?}, repo_id: {}, .. }}",
            self.role, self.repo_id
        )
    }
}

impl Keys {
    /// New random key material for a new repository.
    pub fn generate(repo_id: &str) -> Keys {
        let data = age::x25519::Identity::generate();
        Keys {
            role: KeyRole::Restore,
            repo_id: repo_id.to_string(),
            meta_identity: age::x25519::Identity::generate(),
            dedup_key: rand::random(),
            chunker_seed: rand::random(),
            data_recipients: vec![data.to_public()],
            data_identity: Some(crypto::DataIdentity::new(data)),
            config_hash: None,
        }
    }

    pub fn meta_recipient(&self) -> age::x25519::Recipient {
        self.meta_identity.to_public()
    }

    /// The same keys without the DATA identity.
    pub fn to_backup(&self) -> Keys {
        Keys {
            role: KeyRole::Backup,
            data_identity: None,
            ..self.clone()
        }
    }

    /// The DATA identity, or a key error saying the restore key is needed.
    ///
    /// # Errors
    /// When this is a backup key.
    pub fn data_identity(&self, for_what: &str) -> Result<&crypto::DataIdentity, LabError> {
        self.data_identity.as_ref().ok_or_else(|| {
            LabError::key(format!(
                "{for_what} needs the restore key (DATA identity); the key given is a backup key, which cannot decrypt backed-up data. Pass --restore-key <file> or set LABCTL_RESTORE_KEY"
            ))
        })
    }

    pub fn to_json(&self) -> String {
        let f = KeyFileV1 {
            labctl_key: 1,
            role: self.role,
            repo_id: self.repo_id.clone(),
            meta_identity: crypto::identity_to_string(&self.meta_identity),
            dedup_key: hex::encode(self.dedup_key),
            chunker_seed: hex::encode(self.chunker_seed),
            data_recipients: self.data_recipients.iter().map(|r| r.to_string()).collect(),
            data_identity: self
                .data_identity
                .as_ref()
                .map(|d| crypto::identity_to_string(d.x25519())),
            config_hash: self.config_hash.map(|h| h.hex()),
        };
        serde_json::to_string_pretty(&f).expect("serializable") + "\n"
    }

    /// Parses key file text; `what` names the file in errors (never its content).
    ///
    /// # Errors
    /// A key error describing the malformed field.
    pub fn from_json(text: &str, what: &str) -> Result<Keys, LabError> {
        let bad =
            |field: &str| LabError::key(format!("key file {what}: field '{field}' is malformed"));
        let f: KeyFileV1 = serde_json::from_str(text).map_err(|e| {
            // serde_json's message can quote the offending value, which may be
            // secret: report only the position and the kind of problem.
            let kind = match e.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    "not valid JSON"
                }
                _ => "a missing, unknown or malformed field",
            };
            LabError::key(format!(
                "key file {what} is not a labctl key file: {kind} at line {}, column {}",
                e.line(),
                e.column()
            ))
        })?;
        if f.labctl_key != 1 {
            return Err(LabError::key(format!(
                "key file {what}: key format {} is not supported",
                f.labctl_key
            )));
        }
        let meta_identity = f.meta_identity.parse().map_err(|_| bad("meta-identity"))?;
        let mut dedup_key = [0u8; 32];
        hex::decode_to_slice(&f.dedup_key, &mut dedup_key).map_err(|_| bad("dedup-key"))?;
        let mut chunker_seed = [0u8; 32];
        hex::decode_to_slice(&f.chunker_seed, &mut chunker_seed)
            .map_err(|_| bad("chunker-seed"))?;
        let data_recipients = f
            .data_recipients
            .iter()
            .map(|r| r.parse().map_err(|_| bad("data-recipients")))
            .collect::<Result<Vec<_>, _>>()?;
        if data_recipients.is_empty() {
            return Err(bad("data-recipients"));
        }
        let data_identity = match &f.data_identity {
            Some(s) => Some(crypto::DataIdentity::new(
                s.parse::<age::x25519::Identity>()
                    .map_err(|_| bad("data-identity"))?,
            )),
            None => None,
        };
        if (f.role == KeyRole::Restore) != data_identity.is_some() {
            return Err(bad("role"));
        }
        let config_hash = match &f.config_hash {
            Some(h) => Some(Id::from_hex(h).ok_or_else(|| bad("config-hash"))?),
            None => None,
        };
        Ok(Keys {
            role: f.role,
            repo_id: f.repo_id,
            meta_identity,
            dedup_key,
            chunker_seed,
            data_recipients,
            data_identity,
            config_hash,
        })
    }

    /// Reads a key file, refusing one that group or others can read.
    ///
    /// # Errors
    /// A key error naming the file.
    pub fn load(path: &Path) -> Result<Keys, LabError> {
        let what = path.display().to_string();
        let meta = fs::metadata(path)
            .map_err(|e| LabError::key(format!("cannot read key file {what}: {e}")))?;
        check_private(path, &meta)?;
        let text = fs::read_to_string(path)
            .map_err(|e| LabError::key(format!("cannot read key file {what}: {e}")))?;
        Keys::from_json(&text, &what)
    }

    /// Writes a key file with mode 0600; refuses to replace an existing file.
    ///
    /// # Errors
    /// When the file exists or cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), LabError> {
        let what = path.display();
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                LabError::refused(format!(
                    "cannot create key file {what}: {e} (labctl never overwrites a key file)"
                ))
            })?;
        f.write_all(self.to_json().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| LabError::storage(format!("writing key file {what}: {e}")))
    }
}

use crate::util::secret::check_private;

/// Reads a passphrase file (first line), refusing one others can read.
///
/// # Errors
/// A key error naming the file.
pub fn read_passphrase_file(path: &Path) -> Result<String, LabError> {
    let meta = fs::metadata(path).map_err(|e| {
        LabError::key(format!(
            "cannot read passphrase file {}: {e}",
            path.display()
        ))
    })?;
    check_private(path, &meta)?;
    let text = fs::read_to_string(path).map_err(|e| {
        LabError::key(format!(
            "cannot read passphrase file {}: {e}",
            path.display()
        ))
    })?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(LabError::key(format!(
            "passphrase file {} is empty",
            path.display()
        )));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_and_backup_key_has_no_data_identity() {
        let k = Keys::generate("r1");
        let back = Keys::from_json(&k.to_json(), "t").unwrap();
        assert!(back.data_identity.is_some());
        let b = Keys::from_json(&k.to_backup().to_json(), "t").unwrap();
        assert_eq!(b.role, KeyRole::Backup);
        assert!(b.data_identity.is_none());
        assert!(
            !k.to_backup().to_json().contains("AGE-SECRET-KEY-1") || {
                // the META identity is present, the DATA one is not
                let data = crypto::identity_to_string(k.data_identity.as_ref().unwrap().x25519());
                !k.to_backup().to_json().contains(&data)
            }
        );
        assert_eq!(
            b.data_identity("restore").err().map(|e| e.exit_code()),
            Some(crate::error::ExitCode::Key)
        );
    }

    #[test]
    fn parse_errors_never_quote_values() {
        let k = Keys::generate("r");
        let secret = crypto::identity_to_string(k.data_identity.as_ref().unwrap().x25519());
        let text = k.to_json().replace(
            "\"data-recipients\": [",
            &format!("\"data-recipients\": \"{secret}\", \"x\": ["),
        );
        let err = Keys::from_json(&text, "k").unwrap_err();
        assert!(!err.message().contains(&secret), "{}", err.message());
        assert!(err.message().contains("line"), "{}", err.message());
    }

    #[test]
    fn refuses_readable_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        Keys::generate("r").save(&p).unwrap();
        assert!(Keys::load(&p).is_ok());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keys::load(&p).unwrap_err();
        assert!(err.message().contains("chmod 600"), "{}", err.message());
    }
}
