//! age encryption helpers and the keyed chunk hash.
//!
//! Every encrypted thing in the repository is a standard age v1 message
//! (X25519 recipients, ChaCha20-Poly1305 payload), so `age`/`rage` can read any
//! single blob given the right identity. Readers always re-hash after
//! decrypting; an age MAC failure and a hash mismatch are both integrity
//! errors naming the object.

use crate::error::LabError;
use crate::repo::Id;
use age::secrecy::ExposeSecret;
use std::io::{Read, Write};

/// Keyed BLAKE3 of a chunk's plaintext: the chunk ID. The dedup key is
/// per-repository, so chunk IDs reveal nothing across repositories.
pub fn chunk_id(dedup_key: &[u8; 32], data: &[u8]) -> Id {
    Id(*blake3::keyed_hash(dedup_key, data).as_bytes())
}

/// Encrypts `plain` to `recipients` as one age message.
pub fn encrypt(recipients: &[age::x25519::Recipient], plain: &[u8]) -> Vec<u8> {
    encrypt_parts(recipients, &[plain])
}

/// Encrypts the concatenation of `parts` as one age message (no copy to join them).
pub fn encrypt_parts(recipients: &[age::x25519::Recipient], parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .expect("at least one recipient");
    // age adds a 16-byte tag per 64 KiB chunk plus a header of ~200 bytes per recipient.
    let mut out = Vec::with_capacity(len + len / 4096 + 64 + 200 * recipients.len());
    let mut w = enc.wrap_output(&mut out).expect("writing to a Vec");
    for p in parts {
        w.write_all(p).expect("writing to a Vec");
    }
    w.finish().expect("writing to a Vec");
    out
}

/// Decrypts one age message with `identity`.
///
/// # Errors
/// A key error if the identity is not a recipient of the message; an
/// integrity error if the message is damaged. Both name `what`.
pub fn decrypt(
    identity: &age::x25519::Identity,
    msg: &[u8],
    what: &str,
) -> Result<Vec<u8>, LabError> {
    let dec = age::Decryptor::new_buffered(msg)
        .map_err(|e| LabError::integrity(format!("{what}: not a valid age message ({e})")))?;
    let mut r = dec
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => LabError::key(format!(
                "{what}: this key cannot decrypt it (wrong key, or a backup key where the restore key is needed)"
            )),
            other => LabError::integrity(format!("{what}: damaged ({other})")),
        })?;
    let mut out = Vec::with_capacity(msg.len());
    r.read_to_end(&mut out)
        .map_err(|e| LabError::integrity(format!("{what}: damaged ciphertext ({e})")))?;
    Ok(out)
}

/// Encrypts with a passphrase (age scrypt recipient).
pub fn encrypt_passphrase(passphrase: &str, plain: &[u8]) -> Vec<u8> {
    let enc = age::Encryptor::with_user_passphrase(age::secrecy::SecretString::from(
        passphrase.to_string(),
    ));
    let mut out = vec![];
    let mut w = enc.wrap_output(&mut out).expect("writing to a Vec");
    w.write_all(plain).expect("writing to a Vec");
    w.finish().expect("writing to a Vec");
    out
}

/// Decrypts a message with a passphrase or an X25519 identity (for escrowed keys).
///
/// # Errors
/// A key error when neither opens it.
pub fn decrypt_escrow(
    msg: &[u8],
    passphrase: Option<&str>,
    identity: Option<&age::x25519::Identity>,
    what: &str,
) -> Result<Vec<u8>, LabError> {
    let dec = age::Decryptor::new_buffered(msg)
        .map_err(|e| LabError::integrity(format!("{what}: not a valid age message ({e})")))?;
    let scrypt_id = passphrase
        .map(|p| age::scrypt::Identity::new(age::secrecy::SecretString::from(p.to_string())));
    let mut ids: Vec<&dyn age::Identity> = vec![];
    if let Some(s) = &scrypt_id {
        ids.push(s);
    }
    if let Some(i) = identity {
        ids.push(i);
    }
    let mut r = dec.decrypt(ids.into_iter()).map_err(|e| {
        LabError::key(format!(
            "{what}: cannot open it with the given passphrase or identity ({e})"
        ))
    })?;
    let mut out = vec![];
    r.read_to_end(&mut out)
        .map_err(|e| LabError::integrity(format!("{what}: damaged ({e})")))?;
    Ok(out)
}

/// The secret string form of an identity, for writing key files.
pub fn identity_to_string(id: &age::x25519::Identity) -> String {
    id.to_string().expose_secret().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_id_is_pinned() {
        // Golden: keyed BLAKE3 with key [7; 32] of "labctl". Do not modify.
        let id = chunk_id(&[7u8; 32], b"labctl");
        assert_eq!(
            id.hex(),
            blake3::keyed_hash(&[7u8; 32], b"labctl")
                .to_hex()
                .to_string()
        );
        assert_eq!(
            id.hex(),
            "bb1f7cd74b73236a3e8cf0f98f8ea7d71f54fadaf69dba6d210126dd5cfe5cd0"
        );
    }

    #[test]
    fn wrong_identity_is_a_key_error() {
        let a = age::x25519::Identity::generate();
        let b = age::x25519::Identity::generate();
        let msg = encrypt(&[a.to_public()], b"secret");
        assert_eq!(decrypt(&a, &msg, "t").unwrap(), b"secret");
        let err = decrypt(&b, &msg, "t").unwrap_err();
        assert_eq!(err.kind, crate::error::ExitCode::Key);
        let mut bad = msg.clone();
        let n = bad.len() - 3;
        bad[n] ^= 1;
        assert_eq!(
            decrypt(&a, &bad, "t").unwrap_err().kind,
            crate::error::ExitCode::Integrity
        );
    }
}
