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

/// Encrypts `plain` to `recipients` as one age message, through
/// `age::Encryptor` (metadata objects: trailers, index, snapshots, escrow).
/// Blobs go through [`Sealer`].
pub fn encrypt(recipients: &[age::x25519::Recipient], plain: &[u8]) -> Vec<u8> {
    encrypt_after(&[], recipients, plain)
}

/// [`encrypt`], with the message written after `prefix` in the same
/// buffer (a large object is not copied once more to put a header first).
pub fn encrypt_after(
    prefix: &[u8],
    recipients: &[age::x25519::Recipient],
    plain: &[u8],
) -> Vec<u8> {
    let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .expect("at least one recipient");
    // age adds a 16-byte tag per 64 KiB chunk plus a header of ~200 bytes per recipient.
    let mut out = Vec::with_capacity(
        prefix.len() + plain.len() + plain.len() / 4096 + 64 + 200 * recipients.len(),
    );
    out.extend_from_slice(prefix);
    let mut w = enc.wrap_output(&mut out).expect("writing to a Vec");
    w.write_all(plain).expect("writing to a Vec");
    w.finish().expect("writing to a Vec");
    out
}

/// How many blobs one sealer encrypts under one file key before it makes a
/// new one (and with it a new header, ephemeral share and X25519 exchange).
pub const BLOBS_PER_FILE_KEY: u32 = 256;

const AGE_INTRO: &[u8] = b"age-encryption.org/v1\n";
const STREAM_CHUNK: usize = 64 * 1024;
type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Writes blobs as standard age v1 messages (X25519 recipients,
/// ChaCha20-Poly1305 STREAM payload in 64 KiB chunks), readable by any age
/// implementation, with two differences from `age::Encryptor` (FORMAT.md,
/// "Blob encryption"):
///
/// - a file key and its header serve up to [`BLOBS_PER_FILE_KEY`] blobs of
///   one sealer. Every blob still has its own random 16-byte payload nonce,
///   and the payload key is HKDF(file key, nonce), so no two blobs share a
///   payload key; what the blobs of one group share is the header (the
///   recipient stanzas and the MAC). The X25519 exchange, which cost about
///   60–80 µs per blob, is paid once per group;
/// - no "grease" stanza (random junk that `age::Encryptor` adds to every
///   header to keep parsers honest; about 95 bytes per blob on average).
///
/// The payload is encrypted in place in the output buffer: one copy of the
/// plaintext, no intermediate chunk buffers.
pub struct Sealer {
    recipients: Vec<age::x25519::Recipient>,
    per_key: u32,
    current: Option<SealKey>,
}

struct SealKey {
    file_key: zeroize::Zeroizing<[u8; 16]>,
    header: Vec<u8>,
    left: u32,
}

impl Sealer {
    pub fn new(recipients: Vec<age::x25519::Recipient>) -> Sealer {
        Sealer::with_reuse(recipients, BLOBS_PER_FILE_KEY)
    }

    /// A sealer whose file keys serve `per_key` messages each (1 = a fresh
    /// file key and header for every message, as `age::Encryptor` does).
    pub fn with_reuse(recipients: Vec<age::x25519::Recipient>, per_key: u32) -> Sealer {
        assert!(!recipients.is_empty(), "at least one recipient");
        Sealer {
            recipients,
            per_key: per_key.max(1),
            current: None,
        }
    }

    fn new_key(&self) -> SealKey {
        use age::Recipient as _;
        use base64::Engine as _;
        use hmac::Mac as _;
        use rand::RngCore as _;
        let mut file_key = zeroize::Zeroizing::new([0u8; 16]);
        rand::rngs::OsRng.fill_bytes(&mut file_key[..]);
        let fk = age_core::format::FileKey::new(Box::new(*file_key));
        let b64 = &base64::engine::general_purpose::STANDARD_NO_PAD;
        let mut header = AGE_INTRO.to_vec();
        for r in &self.recipients {
            let (stanzas, _labels) = r.wrap_file_key(&fk).expect("X25519 wrapping cannot fail");
            for st in stanzas {
                header.extend_from_slice(b"-> ");
                header.extend_from_slice(st.tag.as_bytes());
                for a in &st.args {
                    header.push(b' ');
                    header.extend_from_slice(a.as_bytes());
                }
                header.push(b'\n');
                // Body: base64 without padding in lines of 64 columns; the
                // last line is always shorter than 64 (possibly empty).
                let body = b64.encode(&st.body);
                let mut rest = body.as_bytes();
                loop {
                    let n = rest.len().min(64);
                    header.extend_from_slice(&rest[..n]);
                    header.push(b'\n');
                    rest = &rest[n..];
                    if n < 64 {
                        break;
                    }
                }
            }
        }
        header.extend_from_slice(b"---");
        let mac_key = age_core::primitives::hkdf(&[], b"header", &file_key[..]);
        let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(&mac_key).expect("any key size");
        mac.update(&header);
        header.push(b' ');
        header.extend_from_slice(b64.encode(mac.finalize().into_bytes()).as_bytes());
        header.push(b'\n');
        SealKey {
            file_key,
            header,
            left: self.per_key,
        }
    }

    /// Encrypts the concatenation of `parts` as one age message.
    pub fn seal_parts(&mut self, parts: &[&[u8]]) -> Vec<u8> {
        use rand::RngCore as _;
        if self.current.as_ref().is_none_or(|k| k.left == 0) {
            self.current = Some(self.new_key());
        }
        let key = self.current.as_mut().expect("set above");
        key.left -= 1;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let chunks = len.div_ceil(STREAM_CHUNK).max(1);
        let mut out = Vec::with_capacity(key.header.len() + 16 + len + 16 * chunks);
        out.extend_from_slice(&key.header);
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        let payload_key = zeroize::Zeroizing::new(age_core::primitives::hkdf(
            &nonce,
            b"payload",
            &key.file_key[..],
        ));
        let aead = payload_aead(&payload_key);
        let mut src = parts.iter().copied().filter(|p| !p.is_empty());
        let mut cur: &[u8] = src.next().unwrap_or(&[]);
        for counter in 0..chunks as u64 {
            let start = out.len();
            let mut want = STREAM_CHUNK.min(len - counter as usize * STREAM_CHUNK);
            while want > 0 {
                if cur.is_empty() {
                    cur = src.next().expect("parts hold len bytes");
                }
                let n = want.min(cur.len());
                out.extend_from_slice(&cur[..n]);
                cur = &cur[n..];
                want -= n;
            }
            let tag = aead
                .seal_in_place_separate_tag(
                    stream_nonce(counter, counter + 1 == chunks as u64),
                    ring::aead::Aad::empty(),
                    &mut out[start..],
                )
                .expect("a 64 KiB chunk is within ChaCha20's limits");
            out.extend_from_slice(tag.as_ref());
        }
        out
    }
}

/// The ChaCha20-Poly1305 key of an age payload (c2sp.org/age, "Payload":
/// the STREAM chunks are ChaCha20-Poly1305 with the payload key, an empty
/// AAD and a 12-byte nonce of an 11-byte counter and a last-chunk flag).
/// ring's implementation: 1.7x the throughput of RustCrypto's here (2.1
/// against 1.2 GB/s on 8 KiB messages), and both ends of every backup and
/// restore run through it; what age itself decrypts is unchanged.
fn payload_aead(payload_key: &[u8; 32]) -> ring::aead::LessSafeKey {
    ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, payload_key)
            .expect("a 32-byte key"),
    )
}

/// The nonce of STREAM chunk `counter`: an 11-byte big-endian counter,
/// then the last-chunk flag.
fn stream_nonce(counter: u64, last: bool) -> ring::aead::Nonce {
    let mut n12 = [0u8; 12];
    n12[3..11].copy_from_slice(&counter.to_be_bytes());
    n12[11] = u8::from(last);
    ring::aead::Nonce::assume_unique_for_key(n12)
}

/// The DATA identity with a cache of unwrapped file keys, so blobs that
/// share a header ([`Sealer`]) cost one X25519 exchange per group, not per
/// blob. The cache maps a stanza to the file key this identity unwrapped
/// from it: the same stanza always unwraps to the same key, so a hit gives
/// exactly what the exchange would. age still verifies each message's
/// header MAC and payload with that key.
#[derive(Clone)]
pub struct DataIdentity {
    inner: age::x25519::Identity,
    cache: std::sync::Arc<std::sync::Mutex<StanzaCache>>,
    headers: std::sync::Arc<std::sync::Mutex<HeaderCache>>,
}

type StanzaCache = std::collections::HashMap<(Vec<String>, Vec<u8>), zeroize::Zeroizing<[u8; 16]>>;

/// Headers whose MAC this identity verified, by MAC: the whole header
/// (compared byte for byte on a hit) and its file key.
type HeaderCache = std::collections::HashMap<[u8; 32], (Box<[u8]>, zeroize::Zeroizing<[u8; 16]>)>;

/// Cached file keys kept at most (then the cache starts over).
const STANZA_CACHE_MAX: usize = 1024;

/// A header as [`Sealer`] writes it: where it ends, where the MAC's input
/// ends (after `---`), its X25519 stanzas and its MAC.
struct SealedHeader {
    len: usize,
    mac_input: usize,
    stanzas: Vec<age_core::format::Stanza>,
    mac: [u8; 32],
}

/// The line starting at `at` (without its newline) and where the next starts.
fn line_at(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let n = rest.iter().position(|&b| b == b'\n')?;
    Some((&rest[..n], at + n + 1))
}

/// Parses the header of a message in [`Sealer`]'s shape: the age v1 intro,
/// one or more X25519 stanzas (tag and arguments on the `-> ` line, the
/// body in base64 lines of 64 columns ending with a shorter one) and the
/// `--- ` MAC line (c2sp.org/age, "Header"). `None` for anything else
/// (other stanza types, grease, non-canonical base64): such messages are
/// left to `age::Decryptor`.
fn parse_sealed_header(msg: &[u8]) -> Option<SealedHeader> {
    use base64::Engine as _;
    let b64 = &base64::engine::general_purpose::STANDARD_NO_PAD;
    if !msg.starts_with(AGE_INTRO) {
        return None;
    }
    let mut at = AGE_INTRO.len();
    let mut stanzas = vec![];
    loop {
        let (line, next) = line_at(msg, at)?;
        if let Some(mac) = line.strip_prefix(b"--- ") {
            let mac: [u8; 32] = b64.decode(mac).ok()?.try_into().ok()?;
            if stanzas.is_empty() {
                return None;
            }
            return Some(SealedHeader {
                len: next,
                mac_input: at + 3,
                stanzas,
                mac,
            });
        }
        let mut words = line.strip_prefix(b"-> ")?.split(|&b| b == b' ');
        if words.next()? != b"X25519" {
            return None;
        }
        let args = words
            .map(|w| String::from_utf8(w.to_vec()).ok())
            .collect::<Option<Vec<String>>>()?;
        at = next;
        let mut body = vec![];
        loop {
            let (l, n) = line_at(msg, at)?;
            at = n;
            if l.len() > 64 {
                return None;
            }
            body.extend_from_slice(l);
            if l.len() < 64 {
                break;
            }
        }
        stanzas.push(age_core::format::Stanza {
            tag: "X25519".into(),
            args,
            body: b64.decode(&body).ok()?,
        });
    }
}

impl DataIdentity {
    pub fn new(inner: age::x25519::Identity) -> DataIdentity {
        DataIdentity {
            inner,
            cache: Default::default(),
            headers: Default::default(),
        }
    }

    pub fn x25519(&self) -> &age::x25519::Identity {
        &self.inner
    }

    /// Decrypts one age message, as [`decrypt`] does (same result, same
    /// errors). A message in [`Sealer`]'s shape is opened here without
    /// `age::Decryptor`: its header's MAC is verified once per distinct
    /// header (a [`Sealer`] group shares one; a header byte-equal to one
    /// already verified has the same key and the same valid MAC), and the
    /// payload is decrypted in place in the output, with no per-message
    /// buffers (age's reader allocates and zeroes 64 KiB per message: 3%
    /// of a restore of small files, with its header parsing and MAC
    /// another 3%). Every chunk's tag is still checked. Anything this path
    /// does not accept, damaged or not, goes to `age::Decryptor`, which
    /// then decides and names the error.
    pub fn open(&self, msg: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u8>, LabError> {
        match self.open_sealed(msg) {
            Some(plain) => Ok(plain),
            None => decrypt(self, msg, &what()),
        }
    }

    fn open_sealed(&self, msg: &[u8]) -> Option<Vec<u8>> {
        let h = parse_sealed_header(msg)?;
        let file_key = self.verified_key(msg, &h)?;
        // Payload (c2sp.org/age, "Payload"): a 16-byte nonce, then STREAM
        // chunks of 64 KiB plaintext + 16-byte tag; the last chunk may be
        // full, and is empty only when it is the only one.
        const SEALED_CHUNK: usize = STREAM_CHUNK + 16;
        let (nonce, cipher) = msg.get(h.len..)?.split_at_checked(16)?;
        let chunks = cipher.len().div_ceil(SEALED_CHUNK);
        let last = cipher
            .len()
            .checked_sub(chunks.checked_sub(1)? * SEALED_CHUNK)?;
        if last < 16 || (last == 16 && chunks > 1) {
            return None;
        }
        let payload_key =
            zeroize::Zeroizing::new(age_core::primitives::hkdf(nonce, b"payload", &file_key[..]));
        let aead = payload_aead(&payload_key);
        let mut out = Vec::with_capacity(cipher.len() - 16 * chunks);
        for (counter, chunk) in cipher.chunks(SEALED_CHUNK).enumerate() {
            let (data, tag) = chunk.split_at(chunk.len() - 16);
            let start = out.len();
            out.extend_from_slice(data);
            let tag: [u8; 16] = tag.try_into().ok()?;
            aead.open_in_place_separate_tag(
                stream_nonce(counter as u64, counter + 1 == chunks),
                ring::aead::Aad::empty(),
                ring::aead::Tag::from(tag),
                &mut out[start..],
                0..,
            )
            .ok()?;
        }
        Some(out)
    }

    /// The file key of a sealed header whose MAC is valid: from the cache
    /// of verified headers, or unwrapped and verified now (age's rule for
    /// several stanzas: the first one this identity answers for decides).
    fn verified_key(&self, msg: &[u8], h: &SealedHeader) -> Option<zeroize::Zeroizing<[u8; 16]>> {
        use age::Identity as _;
        use hmac::Mac as _;
        let header = &msg[..h.len];
        if let Some((seen, key)) = self.headers.lock().expect("not poisoned").get(&h.mac) {
            if **seen == *header {
                return Some(key.clone());
            }
        }
        let fk = h.stanzas.iter().find_map(|s| self.unwrap_stanza(s))?.ok()?;
        let key = zeroize::Zeroizing::new(*fk.expose_secret());
        let mac_key = age_core::primitives::hkdf(&[], b"header", &key[..]);
        let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(&mac_key).expect("any key size");
        mac.update(&msg[..h.mac_input]);
        mac.verify_slice(&h.mac).ok()?;
        let mut headers = self.headers.lock().expect("not poisoned");
        if headers.len() >= STANZA_CACHE_MAX {
            headers.clear();
        }
        headers.insert(h.mac, (header.into(), key.clone()));
        Some(key)
    }
}

impl age::Identity for DataIdentity {
    fn unwrap_stanza(
        &self,
        stanza: &age_core::format::Stanza,
    ) -> Option<Result<age_core::format::FileKey, age::DecryptError>> {
        if stanza.tag != "X25519" {
            return None;
        }
        let key = (stanza.args.clone(), stanza.body.clone());
        if let Some(fk) = self.cache.lock().expect("not poisoned").get(&key) {
            return Some(Ok(age_core::format::FileKey::new(Box::new(**fk))));
        }
        let result = self.inner.unwrap_stanza(stanza);
        if let Some(Ok(fk)) = &result {
            let mut cache = self.cache.lock().expect("not poisoned");
            if cache.len() >= STANZA_CACHE_MAX {
                cache.clear();
            }
            cache.insert(key, zeroize::Zeroizing::new(*fk.expose_secret()));
        }
        result
    }
}

/// Decrypts one age message with `identity`.
///
/// # Errors
/// A key error if the identity is not a recipient of the message; an
/// integrity error if the message is damaged. Both name `what`.
pub fn decrypt(identity: &dyn age::Identity, msg: &[u8], what: &str) -> Result<Vec<u8>, LabError> {
    let dec = age::Decryptor::new_buffered(msg)
        .map_err(|e| LabError::integrity(format!("{what}: not a valid age message ({e})")))?;
    let mut r = dec
        .decrypt(std::iter::once(identity))
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

    fn header_of(msg: &[u8]) -> &[u8] {
        let end = msg.windows(4).position(|w| w == b"\n---").unwrap();
        let nl = end + 1 + msg[end + 1..].iter().position(|&b| b == b'\n').unwrap();
        &msg[..=nl]
    }

    #[test]
    fn sealed_messages_are_standard_age_at_every_chunk_boundary() {
        let a = age::x25519::Identity::generate();
        let b = age::x25519::Identity::generate();
        let mut sealer = Sealer::new(vec![a.to_public(), b.to_public()]);
        let mut data = vec![0u8; 3 * STREAM_CHUNK + 5];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        for len in [
            0,
            1,
            STREAM_CHUNK - 1,
            STREAM_CHUNK,
            STREAM_CHUNK + 1,
            2 * STREAM_CHUNK,
            3 * STREAM_CHUNK + 5,
        ] {
            let plain = &data[..len];
            // Split into parts at odd places, including empty parts.
            let cut1 = len / 3;
            let cut2 = len.saturating_sub(7).max(cut1);
            let parts = [
                &plain[..0],
                &plain[..cut1],
                &plain[cut1..cut2],
                &plain[cut2..],
            ];
            let msg = sealer.seal_parts(&parts);
            // age::Decryptor with a plain age identity (no cache) opens it
            // with either recipient.
            assert_eq!(decrypt(&a, &msg, "t").unwrap(), plain, "len {len}");
            assert_eq!(decrypt(&b, &msg, "t").unwrap(), plain, "len {len}");
            let chunks = len.div_ceil(STREAM_CHUNK).max(1);
            assert_eq!(msg.len(), header_of(&msg).len() + 16 + len + 16 * chunks);
            // One stanza per recipient, no grease.
            let stanzas = header_of(&msg).windows(3).filter(|w| w == b"-> ").count();
            assert_eq!(stanzas, 2);
            // Any flipped byte is caught.
            for at in [10, header_of(&msg).len() + 3, msg.len() - 1] {
                let mut bad = msg.clone();
                bad[at] ^= 0x20;
                assert!(decrypt(&a, &bad, "t").is_err(), "len {len} flip at {at}");
            }
        }
    }

    #[test]
    fn a_file_key_serves_a_bounded_group_and_each_blob_has_its_own_nonce() {
        let a = age::x25519::Identity::generate();
        let mut sealer = Sealer::with_reuse(vec![a.to_public()], 3);
        let msgs: Vec<Vec<u8>> = (0..7u8).map(|i| sealer.seal_parts(&[&[i; 100]])).collect();
        let headers: Vec<&[u8]> = msgs.iter().map(|m| header_of(m)).collect();
        assert_eq!(headers[0], headers[1]);
        assert_eq!(headers[1], headers[2]);
        assert_ne!(headers[2], headers[3]);
        assert_eq!(headers[3], headers[5]);
        assert_ne!(headers[5], headers[6]);
        let nonces: std::collections::HashSet<&[u8]> = msgs
            .iter()
            .zip(&headers)
            .map(|(m, h)| &m[h.len()..h.len() + 16])
            .collect();
        assert_eq!(nonces.len(), 7);
        // Same plaintext, same file key: different ciphertext (payload keys differ).
        let mut s1 = Sealer::with_reuse(vec![a.to_public()], 2);
        let (x, y) = (s1.seal_parts(&[b"same"]), s1.seal_parts(&[b"same"]));
        assert_eq!(header_of(&x), header_of(&y));
        assert_ne!(x[header_of(&x).len()..], y[header_of(&y).len()..]);
        // The caching identity opens all of them with one exchange per group.
        let id = DataIdentity::new(a.clone());
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(decrypt(&id, m, "t").unwrap(), vec![i as u8; 100]);
        }
        assert_eq!(id.cache.lock().unwrap().len(), 3);
        // A wrong identity is still a key error, and caches nothing.
        let other = DataIdentity::new(age::x25519::Identity::generate());
        assert_eq!(
            decrypt(&other, &msgs[0], "t").unwrap_err().exit_code(),
            crate::error::ExitCode::Key
        );
        assert!(other.cache.lock().unwrap().is_empty());
    }

    #[test]
    fn the_sealed_path_opens_what_age_opens_and_refuses_what_age_refuses() {
        let a = age::x25519::Identity::generate();
        let b = age::x25519::Identity::generate();
        let mut sealer = Sealer::with_reuse(vec![a.to_public(), b.to_public()], 2);
        let mut data = vec![0u8; 2 * STREAM_CHUNK + 9];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        let what = || "t".to_string();
        for len in [
            0,
            1,
            STREAM_CHUNK - 1,
            STREAM_CHUNK,
            STREAM_CHUNK + 1,
            2 * STREAM_CHUNK + 9,
        ] {
            let msg = sealer.seal_parts(&[&data[..len]]);
            for ident in [&a, &b] {
                let id = DataIdentity::new(ident.clone());
                // Taken by the sealed path (not handed to age), same bytes as age's.
                assert_eq!(
                    id.open_sealed(&msg).as_deref(),
                    Some(&data[..len]),
                    "len {len}"
                );
                assert_eq!(
                    id.open(&msg, &what).unwrap(),
                    decrypt(ident, &msg, "t").unwrap()
                );
                assert_eq!(id.headers.lock().unwrap().len(), 1);
                // Every damaged byte, truncation or extension is refused
                // by both paths, with the error age gives.
                let h = header_of(&msg).len();
                let mut places: Vec<usize> = (0..h + 40).step_by(3).collect();
                places.extend([h - 2, h + 16, msg.len() - 17, msg.len() - 1]);
                for at in places.into_iter().filter(|&at| at < msg.len()) {
                    let mut bad = msg.clone();
                    bad[at] ^= 0x04;
                    assert_eq!(id.open_sealed(&bad), None, "len {len} flip at {at}");
                    assert_eq!(
                        id.open(&bad, &what).unwrap_err().exit_code(),
                        decrypt(ident, &bad, "t").unwrap_err().exit_code(),
                        "len {len} flip at {at}"
                    );
                }
                for cut in [h, h + 15, h + 16, msg.len() - 1, msg.len() - 16] {
                    assert_eq!(id.open_sealed(&msg[..cut]), None, "len {len} cut at {cut}");
                    assert!(id.open(&msg[..cut], &what).is_err());
                }
                let mut longer = msg.clone();
                longer.extend_from_slice(&[0u8; 17]);
                assert_eq!(id.open_sealed(&longer), None);
                assert!(id.open(&longer, &what).is_err());
            }
        }
        // A header equal to a verified one but for its MAC is verified again (and fails).
        let id = DataIdentity::new(a.clone());
        let msg = sealer.seal_parts(&[b"x"]);
        id.open(&msg, &what).unwrap();
        let h = header_of(&msg).len();
        let mut bad = msg.clone();
        bad[h - 3] ^= 0x01;
        assert_eq!(id.open_sealed(&bad), None);
        // What age::Encryptor writes (a grease stanza) goes to age and opens.
        let plain = encrypt(&[a.to_public()], b"metadata");
        assert_eq!(id.open(&plain, &what).unwrap(), b"metadata");
        // Not a recipient: the key error.
        let other = DataIdentity::new(age::x25519::Identity::generate());
        assert_eq!(other.open_sealed(&msg), None);
        assert_eq!(
            other.open(&msg, &what).unwrap_err().exit_code(),
            crate::error::ExitCode::Key
        );
    }

    #[test]
    fn wrong_identity_is_a_key_error() {
        let a = age::x25519::Identity::generate();
        let b = age::x25519::Identity::generate();
        let msg = encrypt(&[a.to_public()], b"secret");
        assert_eq!(decrypt(&a, &msg, "t").unwrap(), b"secret");
        let err = decrypt(&b, &msg, "t").unwrap_err();
        assert!(matches!(err, crate::error::LabError::Key(_)));
        let mut bad = msg.clone();
        let n = bad.len() - 3;
        bad[n] ^= 1;
        assert_eq!(
            decrypt(&a, &bad, "t").unwrap_err().exit_code(),
            crate::error::ExitCode::Integrity
        );
    }
}
