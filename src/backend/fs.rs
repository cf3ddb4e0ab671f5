//! Local filesystem backend.
//!
//! Layout: each object name is a relative path below the repository root.
//! `put` writes `<dir>/.tmp-<random>`, fsyncs it, then hard-links it to the
//! final name (`link` fails if the name exists, so an existing object is never
//! replaced, even by a racing writer), removes the temporary name and fsyncs
//! the directory. Readers therefore see whole objects or none.
//!
//! Objects of 1 MiB and more (packs) are written with `O_DIRECT` where the
//! filesystem allows it (see [`crate::util::directio`]).

use super::{Backend, BackendError, BackendResult, ObjectInfo};
use crate::util::directio::DirectWriter;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct FsBackend {
    root: PathBuf,
}

impl FsBackend {
    pub fn new(root: impl AsRef<Path>) -> Self {
        FsBackend {
            root: root.as_ref().to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn io(name: &str, source: std::io::Error) -> BackendError {
        if source.kind() == ErrorKind::NotFound {
            BackendError::NotFound {
                name: name.to_string(),
            }
        } else {
            BackendError::Io {
                name: name.to_string(),
                cause: source,
            }
        }
    }

    fn write_new(&self, name: &str, data: &[u8]) -> std::io::Result<bool> {
        let path = self.path(name);
        let dir = path.parent().expect("object names have a parent");
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
        let result = (|| {
            let mut w = DirectWriter::create_new(&tmp, data.len() as u64)?;
            w.write(data)?;
            let f = w.finish(data.len() as u64)?;
            f.sync_all()?;
            drop(f);
            match fs::hard_link(&tmp, &path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })();
        let _ = fs::remove_file(&tmp);
        if let Ok(true) = result {
            File::open(dir)?.sync_all()?;
        }
        result
    }
}

impl Backend for FsBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, name: &str, data: &[u8]) -> BackendResult<()> {
        match self.write_new(name, data) {
            Ok(true) => Ok(()),
            Ok(false) => Err(BackendError::AlreadyExists {
                name: name.to_string(),
            }),
            Err(e) => Err(BackendError::Io {
                name: name.to_string(),
                cause: e,
            }),
        }
    }

    fn get(&self, name: &str) -> BackendResult<Vec<u8>> {
        fs::read(self.path(name)).map_err(|e| Self::io(name, e))
    }

    fn get_range(&self, name: &str, offset: u64, len: u64) -> BackendResult<Vec<u8>> {
        let mut f = File::open(self.path(name)).map_err(|e| Self::io(name, e))?;
        let size = f.metadata().map_err(|e| Self::io(name, e))?.len();
        if offset + len > size {
            return Err(BackendError::ShortRead {
                name: name.to_string(),
                offset,
                end: offset + len,
                size,
            });
        }
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| Self::io(name, e))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).map_err(|e| Self::io(name, e))?;
        Ok(buf)
    }

    /// Temporary files of writes that never finished (a killed process):
    /// `.tmp-*` anywhere in the repository, with their modification time.
    fn unfinished_uploads(&self) -> BackendResult<Vec<super::Upload>> {
        let mut out = vec![];
        let mut stack = vec![(self.path(""), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Self::io(&rel, e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| Self::io(&rel, e))?;
                let fname = entry.file_name().to_string_lossy().to_string();
                let child = if rel.is_empty() {
                    fname.clone()
                } else {
                    format!("{rel}/{fname}")
                };
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    stack.push((entry.path(), child));
                } else if fname.starts_with(".tmp-") {
                    out.push(super::Upload {
                        key: child.clone(),
                        id: child,
                        initiated: meta.modified().ok(),
                    });
                }
            }
        }
        Ok(out)
    }

    fn abort_upload(&self, upload: &super::Upload) -> BackendResult<()> {
        let name = upload.key.rsplit('/').next().unwrap_or("");
        if !name.starts_with(".tmp-") || upload.key.split('/').any(|p| p == "..") {
            return Ok(()); // only ever temporary files
        }
        match fs::remove_file(self.path(&upload.key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(&upload.key, e)),
        }
    }

    fn list(&self, prefix: &str, f: &mut dyn FnMut(ObjectInfo)) -> BackendResult<()> {
        // Prefixes are directories ("packs/", "index/") or a file name.
        let dir = self.path(prefix.trim_end_matches('/'));
        let mut stack = vec![(dir, prefix.trim_end_matches('/').to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Self::io(&rel, e)),
            };
            let mut entries: Vec<_> = rd
                .collect::<Result<_, _>>()
                .map_err(|e| Self::io(&rel, e))?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let fname = entry.file_name().to_string_lossy().to_string();
                if fname.starts_with(".tmp-") {
                    continue;
                }
                let child = if rel.is_empty() {
                    fname.clone()
                } else {
                    format!("{rel}/{fname}")
                };
                let meta = entry.metadata().map_err(|e| Self::io(&child, e))?;
                if meta.is_dir() {
                    stack.push((entry.path(), child));
                } else {
                    f(ObjectInfo {
                        name: child,
                        size: meta.len(),
                    });
                }
            }
        }
        Ok(())
    }

    fn stat(&self, name: &str) -> BackendResult<Option<u64>> {
        match fs::metadata(self.path(name)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(name, e)),
        }
    }

    fn delete(&self, name: &str) -> BackendResult<()> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(name, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_never_overwrites_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let b = FsBackend::new(dir.path());
        b.put("packs/ab/abc", b"one").unwrap();
        let err = b.put("packs/ab/abc", b"two").unwrap_err();
        assert!(matches!(err, BackendError::AlreadyExists { .. }));
        assert_eq!(b.get("packs/ab/abc").unwrap(), b"one");
        assert_eq!(b.get_range("packs/ab/abc", 1, 2).unwrap(), b"ne");
        assert!(matches!(
            b.get_range("packs/ab/abc", 2, 5),
            Err(BackendError::ShortRead { .. })
        ));
        let mut names = vec![];
        b.list("packs/", &mut |o| names.push((o.name, o.size)))
            .unwrap();
        assert_eq!(names, vec![("packs/ab/abc".to_string(), 3)]);
        assert!(matches!(
            b.get("index/x"),
            Err(BackendError::NotFound { .. })
        ));
        assert_eq!(b.stat("index/x").unwrap(), None);
    }

    #[test]
    fn large_objects_round_trip_with_unaligned_tail() {
        let dir = tempfile::tempdir().unwrap();
        let b = FsBackend::new(dir.path());
        let data: Vec<u8> = (0..(5 << 20) + 1234).map(|i| (i * 7 % 251) as u8).collect();
        b.put("packs/00/big", &data).unwrap();
        assert_eq!(b.get("packs/00/big").unwrap(), data);
    }
}
