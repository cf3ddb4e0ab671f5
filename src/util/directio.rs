//! Large sequential writes with `O_DIRECT` through an aligned bounce buffer.
//!
//! Used for pack objects and for large restored files: the data then goes to
//! disk without the kernel's copy into the page cache (which, on the VMs the
//! lab runs on, costs more CPU than compressing it) and without evicting the
//! host's cached working set during nightly jobs. Writes are 4 KiB-aligned
//! full blocks; zero runs become holes; the unaligned tail is written after
//! clearing `O_DIRECT`. When the filesystem refuses `O_DIRECT` (tmpfs) or the
//! file is small, the same writer uses ordinary buffered writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

const ALIGN: usize = 4096;
const BLOCK: usize = 4 << 20;
/// Files expected to be smaller than this are written buffered.
pub const DIRECT_MIN: u64 = 1 << 20;

/// A 4 KiB-aligned heap buffer.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// The buffer is plain memory owned by one writer at a time.
unsafe impl Send for Aligned {}

/// Buffers kept by a thread after use, so the next writer on that thread
/// does not fault in fresh pages (a new 4 MiB buffer per pack or per
/// restored file was a third of a backup's page faults).
struct Spare(Vec<(*mut u8, std::alloc::Layout)>);

impl Drop for Spare {
    fn drop(&mut self) {
        for (ptr, layout) in self.0.drain(..) {
            unsafe { std::alloc::dealloc(ptr, layout) }
        }
    }
}

const SPARE_MAX: usize = 2;

thread_local! {
    static SPARE: std::cell::RefCell<Spare> = const { std::cell::RefCell::new(Spare(Vec::new())) };
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("valid layout");
        let reused = SPARE
            .try_with(|s| {
                let mut s = s.borrow_mut();
                let i = s.0.iter().position(|(_, l)| *l == layout)?;
                Some(s.0.swap_remove(i).0)
            })
            .ok()
            .flatten();
        if let Some(ptr) = reused {
            return Aligned { ptr, layout };
        }
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Aligned { ptr, layout }
    }
    fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let (ptr, layout) = (self.ptr, self.layout);
        let kept = SPARE
            .try_with(|s| {
                let mut s = s.borrow_mut();
                if s.0.len() < SPARE_MAX {
                    s.0.push((ptr, layout));
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        if !kept {
            unsafe { std::alloc::dealloc(ptr, layout) }
        }
    }
}

/// Opens `path` for writing with `O_DIRECT` (creating it when `create`);
/// `None` when the filesystem refuses `O_DIRECT`.
fn open_direct(path: &Path, create: bool) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .write(true)
        .create_new(create)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Turns `O_DIRECT` off on an open file, for its unaligned writes.
fn clear_direct(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Smallest aligned interior [`write_at`] sends through `O_DIRECT`; less is
/// written buffered (a small direct write waits for the disk for little).
pub const DIRECT_WRITE_MIN: usize = 64 << 10;

/// Writes `data` at `offset` of an existing file: the 4 KiB-aligned
/// interior of the range with `O_DIRECT` (through a per-thread aligned
/// bounce buffer), the unaligned edges buffered. The interiors of writes to
/// disjoint ranges never share a page with each other's edges, so threads
/// may write neighbouring ranges of one file at the same time. Returns
/// `false`, having written everything buffered, when the filesystem refuses
/// `O_DIRECT`.
///
/// # Errors
/// Open and write errors (a full disk among them).
pub fn write_at(path: &Path, data: &[u8], offset: u64, try_direct: bool) -> io::Result<bool> {
    let a = ALIGN as u64;
    let end = offset + data.len() as u64;
    let start_in = offset.div_ceil(a) * a;
    let end_in = end / a * a;
    let interior = end_in.saturating_sub(start_in) as usize;
    if !try_direct || interior < DIRECT_WRITE_MIN {
        let f = OpenOptions::new().write(true).open(path)?;
        f.write_all_at(data, offset)?;
        return Ok(try_direct);
    }
    let Some(f) = open_direct(path, false)? else {
        let f = OpenOptions::new().write(true).open(path)?;
        f.write_all_at(data, offset)?;
        return Ok(false);
    };
    let head = (start_in - offset) as usize;
    let mut buf = Aligned::new(BLOCK);
    let mut done = 0usize;
    while done < interior {
        let n = (interior - done).min(BLOCK);
        let from = head + done;
        buf.as_mut_slice()[..n].copy_from_slice(&data[from..from + n]);
        f.write_all_at(&buf.as_slice()[..n], start_in + done as u64)?;
        done += n;
    }
    let tail = head + interior;
    if head > 0 || tail < data.len() {
        clear_direct(&f)?;
        f.write_all_at(&data[..head], offset)?;
        f.write_all_at(&data[tail..], end_in)?;
    }
    Ok(true)
}

/// Whether `buf` holds only zero bytes (cheap for data that does not: it
/// stops at the first non-zero word).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Smallest all-zero blob a restore leaves as a hole instead of writing.
pub const HOLE_MIN: usize = 4096;

/// Writes a new file sequentially, with holes for zero runs.
pub struct DirectWriter {
    file: File,
    buf: Aligned,
    /// Bytes in `buf`.
    len: usize,
    /// File offset of `buf[0]`; a multiple of 4 KiB.
    offset: u64,
    /// End of the last write: the file's length (it was created empty).
    written_end: u64,
    direct: bool,
    /// An owned chunk given to [`Self::write_vec`] while the buffer was
    /// empty, not yet copied anywhere (see there).
    held: Option<Vec<u8>>,
}

impl DirectWriter {
    /// Creates `path` (which must not exist); `O_DIRECT` when `size_hint`
    /// is at least [`DIRECT_MIN`] and the filesystem allows it.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn create_new(path: &Path, size_hint: u64) -> io::Result<DirectWriter> {
        let direct_file = if size_hint >= DIRECT_MIN {
            open_direct(path, true)?
        } else {
            None
        };
        let direct = direct_file.is_some();
        let file = match direct_file {
            Some(f) => f,
            None => OpenOptions::new().write(true).create_new(true).open(path)?,
        };
        let cap = if direct { BLOCK } else { 256 * 1024 };
        Ok(DirectWriter {
            file,
            buf: Aligned::new(cap),
            len: 0,
            offset: 0,
            written_end: 0,
            direct,
            held: None,
        })
    }

    fn flush_buf(&mut self, n: usize) -> io::Result<()> {
        self.file
            .write_all_at(&self.buf.as_slice()[..n], self.offset)?;
        self.offset += n as u64;
        self.written_end = self.offset;
        self.buf.as_mut_slice().copy_within(n..self.len, 0);
        self.len -= n;
        Ok(())
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// Write errors (a full disk among them).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.copy_in_held()?;
        self.copy_in(data)
    }

    /// Copies a held chunk (see [`Self::write_vec`]) into the buffer, for
    /// whatever is appended after it.
    fn copy_in_held(&mut self) -> io::Result<()> {
        match self.held.take() {
            Some(held) => self.copy_in(&held),
            None => Ok(()),
        }
    }

    /// Appends an owned chunk. A buffered writer whose buffer is empty
    /// keeps the chunk as it is rather than copying it into the buffer:
    /// when nothing follows (a small file's only chunk), [`Self::finish`]
    /// hands it to the kernel straight from where it was decoded. In a
    /// restore of a million small files that copy was 8 GiB of `memmove`.
    /// A writer holds at most one chunk (the restore's window has already
    /// counted it back as written).
    ///
    /// # Errors
    /// Write errors (a full disk among them).
    pub fn write_vec(&mut self, data: Vec<u8>) -> io::Result<()> {
        if self.direct || self.len > 0 || self.held.is_some() {
            return self.write(&data);
        }
        self.held = Some(data);
        Ok(())
    }

    fn copy_in(&mut self, mut data: &[u8]) -> io::Result<()> {
        let cap = self.buf.layout.size();
        while !data.is_empty() {
            let n = (cap - self.len).min(data.len());
            self.buf.as_mut_slice()[self.len..self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == cap {
                self.flush_buf(cap)?;
            }
        }
        Ok(())
    }

    /// Appends `n` zero bytes, leaving a hole where alignment allows.
    ///
    /// # Errors
    /// Write errors.
    pub fn zeros(&mut self, mut n: u64) -> io::Result<()> {
        const Z: [u8; ALIGN] = [0u8; ALIGN];
        self.copy_in_held()?;
        let pad = ((ALIGN - self.len % ALIGN) % ALIGN) as u64;
        let take = pad.min(n);
        self.write(&Z[..take as usize])?;
        n -= take;
        if n == 0 {
            return Ok(());
        }
        if self.len > 0 {
            self.flush_buf(self.len)?;
        }
        let whole = n / ALIGN as u64 * ALIGN as u64;
        self.offset += whole;
        self.write(&Z[..(n - whole) as usize])
    }

    /// Writes what is buffered and sets the final size (a file whose
    /// writes already end there is not truncated again: one system call
    /// per small file less).
    ///
    /// # Errors
    /// Write errors.
    pub fn finish(mut self, size: u64) -> io::Result<File> {
        if let Some(held) = self.held.take() {
            // Only ever held with an empty buffer (see `write_vec`).
            self.file.write_all_at(&held, self.offset)?;
            self.offset += held.len() as u64;
            self.written_end = self.offset;
        }
        if self.direct {
            let aligned = self.len / ALIGN * ALIGN;
            if aligned > 0 {
                self.flush_buf(aligned)?;
            }
            if self.len > 0 {
                clear_direct(&self.file)?;
            }
        }
        // Buffered: the rest in one write (no aligned split needed).
        if self.len > 0 {
            self.flush_buf(self.len)?;
        }
        if self.written_end != size {
            self.file.set_len(size)?;
        }
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_and_zero_runs_in_any_alignment() {
        // Several files on one thread: the later writers re-use the earlier
        // ones' buffers, stale bytes and all.
        let dir = tempfile::tempdir().unwrap();
        for (seed, hint) in [(1u64, 8 << 20), (7, 8 << 20), (99, 1000), (5, 8 << 20)] {
            // Ending in data, in a hole with a partial block, and in a
            // hole of whole blocks (the size must still come out right).
            for trailing in [0, 5000, 8192] {
                write_one(dir.path(), seed, hint, trailing);
            }
        }
    }

    #[test]
    fn a_file_ending_in_a_hole_gets_its_size() {
        let dir = tempfile::tempdir().unwrap();
        for hint in [1000, 8 << 20] {
            let p = dir.path().join(format!("h{hint}"));
            let mut w = DirectWriter::create_new(&p, hint).unwrap();
            w.write(&[7u8; 4096]).unwrap();
            w.zeros(3 * 4096).unwrap();
            w.finish(4 * 4096).unwrap();
            let got = std::fs::read(&p).unwrap();
            assert_eq!(got.len(), 4 * 4096, "hint {hint}");
            assert!(got[..4096].iter().all(|&b| b == 7) && got[4096..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn owned_chunks_alone_or_followed_are_written_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..5000u32).map(|k| (k % 251) as u8 | 1).collect();
        let b: Vec<u8> = (0..70_000u32).map(|k| (k % 253) as u8 | 2).collect();
        let zeros = |n: usize| vec![0u8; n];
        type Step = fn(&mut DirectWriter, &[u8], &[u8]);
        let cases: [(&str, Step, Vec<u8>); 5] = [
            (
                "alone",
                |w, a, _| w.write_vec(a.to_vec()).unwrap(),
                a.clone(),
            ),
            (
                "then owned",
                |w, a, b| {
                    w.write_vec(a.to_vec()).unwrap();
                    w.write_vec(b.to_vec()).unwrap();
                },
                [a.clone(), b.clone()].concat(),
            ),
            (
                "then borrowed",
                |w, a, b| {
                    w.write_vec(a.to_vec()).unwrap();
                    w.write(b).unwrap();
                },
                [a.clone(), b.clone()].concat(),
            ),
            (
                "then zeros",
                |w, a, _| {
                    w.write_vec(a.to_vec()).unwrap();
                    w.zeros(9000).unwrap();
                },
                [a.clone(), zeros(9000)].concat(),
            ),
            (
                "after zeros",
                |w, a, _| {
                    w.zeros(8192).unwrap();
                    w.write_vec(a.to_vec()).unwrap();
                },
                [zeros(8192), a.clone()].concat(),
            ),
        ];
        for hint in [1000, 8 << 20] {
            for (name, step, want) in &cases {
                let p = dir.path().join(format!("{name}-{hint}"));
                let mut w = DirectWriter::create_new(&p, hint).unwrap();
                step(&mut w, &a, &b);
                w.finish(want.len() as u64).unwrap();
                assert_eq!(&std::fs::read(&p).unwrap(), want, "{name}, hint {hint}");
            }
        }
    }

    fn write_one(dir: &Path, seed: u64, hint: u64, trailing: usize) {
        let mut expected = vec![];
        let p = dir.join(format!("f{seed}-{trailing}"));
        let mut w = DirectWriter::create_new(&p, hint).unwrap();
        let mut rng = seed;
        for i in 0..40 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = (rng >> 40) as usize % 300_000;
            if i % 3 == 0 {
                w.zeros(n as u64).unwrap();
                expected.extend(std::iter::repeat_n(0u8, n));
            } else {
                let d: Vec<u8> = (0..n).map(|k| (k as u64 ^ rng) as u8 | 1).collect();
                expected.extend_from_slice(&d);
                if rng & (1 << 33) == 0 {
                    w.write(&d).unwrap();
                } else {
                    w.write_vec(d).unwrap();
                }
            }
        }
        w.zeros(trailing as u64).unwrap();
        expected.extend(std::iter::repeat_n(0u8, trailing));
        w.finish(expected.len() as u64).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), expected);
    }

    #[test]
    fn positional_writes_from_threads_in_any_alignment() {
        // Neighbouring ranges of one file written by several threads at
        // once, in shuffled order: interiors direct, edges buffered.
        let dir = tempfile::tempdir().unwrap();
        let mut dirs = vec![dir.path().to_path_buf()];
        // tmpfs too (it refuses O_DIRECT before Linux 6.6).
        let shm = Path::new("/dev/shm");
        let shm_dir = shm
            .is_dir()
            .then(|| tempfile::tempdir_in(shm).ok())
            .flatten();
        if let Some(d) = &shm_dir {
            dirs.push(d.path().to_path_buf());
        }
        for d in dirs {
            let p = d.join("f");
            let mut rng = 42u64;
            let mut ranges = vec![];
            let mut pos = 0u64;
            for _ in 0..60 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let n = match rng >> 62 {
                    0 => (rng >> 20) % 5000,
                    1 => 64 * 1024 + (rng >> 20) % 9000,
                    2 => 256 * 1024,
                    _ => (rng >> 20) % (5 << 20),
                };
                ranges.push((pos, n as usize, rng));
                pos += n;
            }
            let size = pos + 12345;
            File::create(&p).unwrap().set_len(size).unwrap();
            let mut expected = vec![0u8; size as usize];
            for &(off, n, seed) in &ranges {
                for k in 0..n {
                    expected[off as usize + k] = (k as u64 ^ seed) as u8 | 1;
                }
            }
            ranges.reverse();
            let next = std::sync::Mutex::new(ranges);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| loop {
                        let Some((off, n, seed)) = next.lock().unwrap().pop() else {
                            break;
                        };
                        let data: Vec<u8> = (0..n).map(|k| (k as u64 ^ seed) as u8 | 1).collect();
                        write_at(&p, &data, off, true).unwrap();
                    });
                }
            });
            assert_eq!(std::fs::read(&p).unwrap(), expected, "{}", d.display());
        }
    }
}
