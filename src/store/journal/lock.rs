//! One process per database file: an exclusive advisory lock (`flock`) on `<database>.lock`,
//! which holds the holder's PID. The OS releases the lock with the process, so a killed
//! holder leaves no stale lock behind. The file itself stays: deleting it could let two
//! processes lock two different files under the same name.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::JournalError;

/// The lock on one database file, held until [`StoreLock::release`] or drop.
pub(super) struct StoreLock {
    file: Mutex<Option<File>>,
}

impl StoreLock {
    /// Takes the lock for `database` at once, or fails naming the process that holds it.
    pub(super) fn acquire(database: &Path) -> Result<Self, JournalError> {
        let path = lock_path(database);
        let failed = |source| JournalError::Lock {
            path: path.clone(),
            source: Arc::new(source),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(failed)?;
        // Qualified: std's own `File::try_lock` is newer than this crate's minimum Rust.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                return Err(JournalError::InUse {
                    path: database.to_owned(),
                    pid: holder(&mut file),
                });
            }
            Err(fs4::TryLockError::Error(source)) => return Err(failed(source)),
        }
        // Written over the last holder's PID, then cut to length (not emptied first): a
        // reader finds a PID whenever one was ever written.
        let pid = format!("{}\n", std::process::id());
        if let Err(source) = file
            .write_all(pid.as_bytes())
            .and_then(|()| file.set_len(pid.len() as u64))
        {
            unlock(&file);
            return Err(failed(source));
        }
        Ok(Self {
            file: Mutex::new(Some(file)),
        })
    }

    /// Releases the lock now; dropping it does the same.
    pub(super) fn release(&self) {
        if let Some(file) = self
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            unlock(&file);
        }
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        self.release();
    }
}

/// Unlocks explicitly rather than only closing the file: a child process forked meanwhile
/// shares the open file until its `exec` closes it, and would hold the lock until then. An
/// error leaves the close to release it.
fn unlock(file: &File) {
    let _ = fs4::FileExt::unlock(file);
}

/// `callops.db` -> `callops.db.lock`, beside it.
fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The PID the holder wrote, if it can be read.
fn holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_beside_the_database() {
        assert_eq!(
            lock_path(Path::new("/data/callops.db")),
            Path::new("/data/callops.db.lock")
        );
    }
}
