//! Reproducible benchmark data for `benches/run.py`.
//!
//! `benchdata generate <dir> <MiB>`: a VM-image-like file (zero runs, random,
//! text and repeated blocks, 60%), two large mixed files (10% each) and a tree
//! of small text files (20%).
//! `benchdata mutate <dir> [<MiB for the 1 GiB-relative layout>]`: scattered
//! 64 KiB writes over ~2% of the image, and 100 bytes inserted 4 KiB into
//! the first large file.
//! `benchdata small <dir> <files>`: a notebook PVC full of a dataset: the
//! files (1–16 KiB, half text, half random like compressed images) in
//! directories of 1,000 (1,000,000 files: 1,000 directories, ~8.1 GiB).
//! `benchdata touch <dir> <per-mille>`: rewrites that share of the small
//! files (same size, new content, new mtime), spread over the tree.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn fill_random(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    fn fill_text(&mut self, b: &mut [u8]) {
        const WORDS: &[&str] = &[
            "epoch",
            "loss",
            "accuracy",
            "model",
            "gpu",
            "batch",
            "learning_rate",
            "kubeflow",
            "mlflow",
            "run",
            "the",
            "of",
            "and",
            "tensor",
            "gradient",
            "checkpoint",
            "dataset",
            "validation",
            "0.0031",
            "1e-4",
            "train",
            "step",
            "notebook",
            "profile",
            "namespace",
            "{\"metric\":",
            "}\n",
        ];
        let mut i = 0;
        while i < b.len() {
            let w = WORDS[(self.next() % WORDS.len() as u64) as usize].as_bytes();
            let n = w.len().min(b.len() - i);
            b[i..i + n].copy_from_slice(&w[..n]);
            i += n;
            if i < b.len() {
                b[i] = if self.next().is_multiple_of(10) {
                    b'\n'
                } else {
                    b' '
                };
                i += 1;
            }
        }
    }
}

const MIB: usize = 1 << 20;

fn write_mixed(path: &Path, mib: usize, rng: &mut Rng, zero_share: u64) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    let mut repeated = vec![0u8; MIB];
    rng.fill_text(&mut repeated);
    let mut buf = vec![0u8; MIB];
    for _ in 0..mib {
        let r = rng.next() % 100;
        if r < zero_share {
            buf.fill(0);
        } else if r < zero_share + 35 {
            rng.fill_random(&mut buf);
        } else if r < zero_share + 75 {
            rng.fill_text(&mut buf);
        } else {
            buf.copy_from_slice(&repeated);
        }
        f.write_all(&buf)?;
    }
    f.sync_all()
}

fn generate(dir: &Path, total_mib: usize) -> std::io::Result<()> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    fs::create_dir_all(dir.join("vm"))?;
    fs::create_dir_all(dir.join("files"))?;
    write_mixed(&dir.join("vm/disk.img"), total_mib * 60 / 100, &mut rng, 30)?;
    write_mixed(
        &dir.join("files/large-1.bin"),
        total_mib * 10 / 100,
        &mut rng,
        0,
    )?;
    write_mixed(
        &dir.join("files/large-2.bin"),
        total_mib * 10 / 100,
        &mut rng,
        0,
    )?;
    let mut left = total_mib * 20 / 100 * MIB;
    let mut n = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let size = (4096 + (rng.next() % (60 * 1024)) as usize).min(left);
        let sub = dir.join(format!("files/small/dir-{:03}", n / 100));
        fs::create_dir_all(&sub)?;
        rng.fill_text(&mut buf[..size]);
        fs::write(sub.join(format!("file-{n:05}.txt")), &buf[..size])?;
        left -= size;
        n += 1;
    }
    Ok(())
}

fn mutate(dir: &Path) -> std::io::Result<()> {
    let mut rng = Rng(0xfeed_beef_cafe_f00d);
    let img = dir.join("vm/disk.img");
    let size = fs::metadata(&img)?.len();
    let writes = (size / 50) / (64 * 1024);
    let mut f = fs::OpenOptions::new().write(true).open(&img)?;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..writes {
        let off = (rng.next() % (size - buf.len() as u64)) & !4095;
        rng.fill_random(&mut buf);
        f.seek(SeekFrom::Start(off))?;
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    let large = dir.join("files/large-1.bin");
    let mut data = vec![];
    fs::File::open(&large)?.read_to_end(&mut data)?;
    let mut out = data[..4096].to_vec();
    out.extend_from_slice(&[0x5a; 100]);
    out.extend_from_slice(&data[4096..]);
    fs::write(&large, out)?;
    println!("mutated: {writes} scattered 64 KiB writes in the image, 100 bytes inserted at 4 KiB in large-1.bin");
    Ok(())
}

/// The path of small file `i` (1,000 per directory).
fn small_path(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("d{:04}", i / 1000))
        .join(format!("f{:07}.dat", i))
}

fn small_content(rng: &mut Rng, buf: &mut [u8]) -> usize {
    let size = 1024 + (rng.next() % (15 * 1024 + 1)) as usize;
    if rng.next().is_multiple_of(2) {
        rng.fill_text(&mut buf[..size]);
    } else {
        rng.fill_random(&mut buf[..size]);
    }
    size
}

fn small(dir: &Path, files: usize) -> std::io::Result<()> {
    let mut rng = Rng(0x5eed_0f5a_11f1_1e50);
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    for i in 0..files {
        if i % 1000 == 0 {
            fs::create_dir_all(small_path(dir, i).parent().expect("parent"))?;
        }
        let n = small_content(&mut rng, &mut buf);
        fs::write(small_path(dir, i), &buf[..n])?;
        total += n as u64;
    }
    println!(
        "{files} files, {:.2} GiB, in {} directories",
        total as f64 / (1u64 << 30) as f64,
        files.div_ceil(1000)
    );
    Ok(())
}

fn touch(dir: &Path, per_mille: usize) -> std::io::Result<()> {
    // Files are numbered 0..n without gaps (see `small`).
    let mut files = 0usize;
    for d in fs::read_dir(dir)? {
        files += fs::read_dir(d?.path())?.count();
    }
    let mut rng = Rng(0x70c4_ed00_0000_0001);
    let mut buf = vec![0u8; 16 * 1024];
    let step = 1000 / per_mille.max(1);
    let mut n = 0;
    let mut i = (rng.next() % step as u64) as usize;
    while i < files {
        let len = fs::metadata(small_path(dir, i))?.len() as usize;
        rng.fill_random(&mut buf[..len]);
        fs::write(small_path(dir, i), &buf[..len])?;
        n += 1;
        i += step;
    }
    println!("rewrote {n} of {files} files");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(|s| s.as_str()) {
        Some("generate") if args.len() == 4 => {
            generate(Path::new(&args[2]), args[3].parse().expect("MiB"))
        }
        Some("mutate") if args.len() == 3 => mutate(Path::new(&args[2])),
        Some("small") if args.len() == 4 => {
            small(Path::new(&args[2]), args[3].parse().expect("files"))
        }
        Some("touch") if args.len() == 4 => {
            touch(Path::new(&args[2]), args[3].parse().expect("per-mille"))
        }
        _ => {
            eprintln!("usage: benchdata generate <dir> <MiB> | benchdata mutate <dir> | benchdata small <dir> <files> | benchdata touch <dir> <per-mille>");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("benchdata: {e}");
        std::process::exit(1);
    }
}
