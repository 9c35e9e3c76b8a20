//! Content hashes of files and folders, cached by (path, size, mtime, inode) as DVC does,
//! so that re-planning a large pipeline hashes only what changed.

use super::layout::{write_atomic, Layout};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A content hash with the size it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentHash {
    /// blake3 hex.
    pub hash: String,
    /// Bytes (for folders: sum of file sizes).
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    hash: String,
}

/// The file-hash cache of a workspace, persisted in `.taper/cache/hashes.json`.
#[derive(Debug, Default)]
pub struct HashCache {
    entries: HashMap<PathBuf, Entry>,
    dirty: bool,
}

impl HashCache {
    /// Loads the cache of `layout`; a missing or unreadable cache is an empty one.
    pub fn load(layout: &Layout) -> HashCache {
        let entries = fs::read(layout.hash_cache())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        HashCache {
            entries,
            dirty: false,
        }
    }

    /// Writes the cache back if it changed.
    pub fn save(&mut self, layout: &Layout) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&self.entries).map_err(io::Error::other)?;
        write_atomic(&layout.hash_cache(), &bytes)?;
        self.dirty = false;
        Ok(())
    }

    /// The hash of a file or folder (folders: blake3 over the sorted list of
    /// `relative path, file hash, executable bit`). Symlinks are followed.
    pub fn hash_path(&mut self, path: &Path) -> io::Result<ContentHash> {
        let meta = fs::metadata(path)?;
        if meta.is_dir() {
            let mut files = Vec::new();
            collect_files(path, path, &mut files)?;
            files.sort();
            let mut h = blake3::Hasher::new();
            let mut bytes = 0;
            for rel in files {
                let full = path.join(&rel);
                let m = fs::metadata(&full)?;
                let fh = self.hash_file(&full, &m)?;
                bytes += m.len();
                h.update(rel.as_bytes());
                h.update(b"\0");
                h.update(fh.as_bytes());
                h.update(if m.mode() & 0o111 != 0 {
                    b"x\n"
                } else {
                    b"-\n"
                });
            }
            Ok(ContentHash {
                hash: format!("d{}", h.finalize().to_hex()),
                bytes,
            })
        } else {
            Ok(ContentHash {
                hash: self.hash_file(path, &meta)?,
                bytes: meta.len(),
            })
        }
    }

    fn hash_file(&mut self, path: &Path, meta: &fs::Metadata) -> io::Result<String> {
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        if let Some(e) = self.entries.get(path) {
            if e.size == meta.len() && e.mtime_ns == mtime_ns && e.inode == meta.ino() {
                return Ok(e.hash.clone());
            }
        }
        let mut hasher = blake3::Hasher::new();
        if meta.len() > 1 << 20 {
            hasher.update_mmap_rayon(path)?;
        } else {
            hasher.update(&fs::read(path)?);
        }
        let hash = hasher.finalize().to_hex().to_string();
        self.entries.insert(
            path.to_path_buf(),
            Entry {
                size: meta.len(),
                mtime_ns,
                inode: meta.ino(),
                hash: hash.clone(),
            },
        );
        self.dirty = true;
        Ok(hash)
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = fs::metadata(&path)?;
        if meta.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_hash_changes_with_content_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("a"), "1").unwrap();
        fs::write(d.join("sub/b"), "2").unwrap();
        let mut cache = HashCache::default();
        let h1 = cache.hash_path(&d).unwrap();
        assert_eq!(h1.bytes, 2);
        fs::write(d.join("sub/b"), "3").unwrap();
        let h2 = cache.hash_path(&d).unwrap();
        assert_ne!(h1.hash, h2.hash);
        fs::rename(d.join("a"), d.join("c")).unwrap();
        assert_ne!(cache.hash_path(&d).unwrap().hash, h2.hash);
        let f = cache.hash_path(&d.join("c")).unwrap();
        assert_eq!(f.hash, blake3::hash(b"1").to_hex().to_string());
    }
}
