//! Thin, safe wrappers over the Linux calls that std does not expose:
//! extended attributes, device nodes, FIFOs, ownership and nanosecond
//! timestamps on symlinks, user and group names, linking and renaming
//! without replacing, page cache advice and a read-only memory map.
//! Everything here works on a
//! path without following a final symlink, because a backup must record (and
//! a restore must recreate) the link itself, never what it points to.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Renames `from` to `to` unless `to` exists (`EEXIST`); `EINVAL` where
/// the file system cannot promise that (`renameat2(RENAME_NOREPLACE)`).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: two valid NUL-terminated paths.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
}

/// Gives an open file (an `O_TMPFILE` one, say) the name `to`, by its
/// descriptor (`linkat(AT_EMPTY_PATH)`; older kernels want
/// `CAP_DAC_READ_SEARCH` and answer `ENOENT` without it).
pub fn link_fd(file: &std::fs::File, to: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let t = cpath(to)?;
    // SAFETY: a valid descriptor, an empty C string and a valid path.
    check(unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
}

/// Advice on how a file's cached pages will be used (`posix_fadvise`).
#[derive(Debug, Clone, Copy)]
pub enum Advice {
    /// About to be read: start reading it into the page cache now.
    WillNeed,
    /// Done with it: drop its clean pages from the page cache.
    DontNeed,
}

/// Gives the kernel advice about all of `file`; advice is only a hint, so
/// failure is reported but harmless.
pub fn advise(file: &std::fs::File, advice: Advice) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let advice = match advice {
        Advice::WillNeed => libc::POSIX_FADV_WILLNEED,
        Advice::DontNeed => libc::POSIX_FADV_DONTNEED,
    };
    // SAFETY: a valid descriptor; the call only advises.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// A read-only, private memory map of a whole file that no one modifies
/// (the caller's promise: the index cache is written under a temporary name
/// and renamed, never changed in place). Pages are read on first touch and
/// are the kernel's to drop again, so a large map costs page cache, not
/// process memory.
pub struct Mapped {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone.
unsafe impl Send for Mapped {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps the first `len` bytes of `file` (non-zero, at most its size),
    /// advising random access: lookups touch one or two pages each, and
    /// read-ahead would only pull in pages no one asked for.
    pub fn new(file: &std::fs::File, len: usize) -> io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty map"));
        }
        // SAFETY: a fresh mapping of a valid descriptor; the kernel picks
        // the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the range just mapped. Advice is only a hint.
        unsafe { libc::madvise(ptr, len, libc::MADV_RANDOM) };
        Ok(Mapped {
            ptr: ptr as *const u8,
            len,
        })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes live at `ptr` until drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapped({} bytes)", self.len)
    }
}

/// Gives an open file the name `to` through its `/proc/self/fd` entry,
/// which needs no capability but a mounted /proc. (The one call here that
/// follows a final symlink: /proc's link to the open file itself.)
pub fn link_fd_via_proc(file: &std::fs::File, to: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = cpath(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
    let t = cpath(to)?;
    // SAFETY: two valid NUL-terminated paths.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

/// Reads every extended attribute of `path` (not following symlinks), sorted
/// by name. Filesystems without xattr support yield an empty list.
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let p = cpath(path)?;
    let mut names = vec![0u8; 1024];
    let len = loop {
        // SAFETY: `p` is a valid C string and `names` is a writable buffer of the given length.
        let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(err),
        }
    };
    let mut out = Vec::new();
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split on NUL");
        let mut value = vec![0u8; 256];
        loop {
            // SAFETY: valid C strings and a writable buffer of the given length.
            let n = unsafe {
                libc::lgetxattr(
                    p.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if n >= 0 {
                value.truncate(n as usize);
                out.push((name.to_vec(), value));
                break;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ERANGE) => value.resize(value.len() * 4, 0),
                // The attribute vanished between list and get.
                Some(libc::ENODATA) => break,
                _ => return Err(err),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Sets one extended attribute on `path` without following symlinks.
pub fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let p = cpath(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: valid C strings, and `value` is readable for its length.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// Creates a FIFO, character or block device node (`mode` includes the type bits).
pub fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: `p` is a valid C string.
    check(unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) })
}

/// Changes owner and group of `path` without following symlinks.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: `p` is a valid C string.
    check(unsafe { libc::lchown(p.as_ptr(), uid, gid) })
}

/// Sets the modification time (and access time to the same value) of `path`
/// with nanosecond precision, without following symlinks.
pub fn set_mtime(path: &Path, secs: i64, nanos: u32) -> io::Result<()> {
    let p = cpath(path)?;
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as _,
    };
    let times = [t, t];
    // SAFETY: valid C string and a two-element timespec array.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Applies owner (when `chown`), mode, xattrs and mtime through an open file:
/// no path lookups, and nothing can be swapped in between. Owner and mode
/// the file already has (one `fstat` tells) are not set again: a file
/// created with its final permission bits by the owner it should have
/// needs only its mtime.
pub fn apply_to_fd(
    file: &std::fs::File,
    chown: Option<(u32, u32)>,
    mode: u32,
    xattrs: &[(&[u8], &[u8])],
    mtime: (i64, u32),
) -> Vec<(&'static str, io::Error)> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut errors = Vec::new();
    // SAFETY: fd is a valid open descriptor for the duration of the call,
    // and `st` is written whole on success.
    let now = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some(st)
    };
    let mut chowned = false;
    if let Some((uid, gid)) = chown {
        if now.is_none_or(|st| (st.st_uid, st.st_gid) != (uid, gid)) {
            // SAFETY: as above.
            if let Err(e) = check(unsafe { libc::fchown(fd, uid, gid) }) {
                errors.push(("set owner", e));
            }
            chowned = true;
        }
    }
    // A change of owner clears setuid and setgid bits: set them after it.
    let special = mode & 0o7000 != 0;
    if (chowned && special) || now.is_none_or(|st| st.st_mode & 0o7777 != mode) {
        // SAFETY: as above.
        if let Err(e) = check(unsafe { libc::fchmod(fd, mode as libc::mode_t) }) {
            errors.push(("set permissions", e));
        }
    }
    for (name, value) in xattrs {
        let Ok(n) = CString::new(*name) else {
            errors.push((
                "set xattr",
                io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"),
            ));
            continue;
        };
        // SAFETY: valid fd and C string; value is readable for its length.
        if let Err(e) =
            check(unsafe { libc::fsetxattr(fd, n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
        {
            errors.push(("set xattr", e));
        }
    }
    let t = libc::timespec {
        tv_sec: mtime.0 as libc::time_t,
        tv_nsec: mtime.1 as _,
    };
    let times = [t, t];
    // SAFETY: valid fd and a two-element timespec array.
    if let Err(e) = check(unsafe { libc::futimens(fd, times.as_ptr()) }) {
        errors.push(("set mtime", e));
    }
    errors
}

/// The effective user ID of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its length.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    if !ok {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The name of the user running this process.
pub fn username() -> String {
    user_name(euid()).unwrap_or_else(|| euid().to_string())
}

static USER_NAMES: Mutex<Option<HashMap<u32, Option<String>>>> = Mutex::new(None);
static GROUP_NAMES: Mutex<Option<HashMap<u32, Option<String>>>> = Mutex::new(None);

/// Looks `id` up once per process through `lookup` (backups ask for the same
/// few IDs millions of times), returning the name it finds.
fn cached_name(
    cache: &Mutex<Option<HashMap<u32, Option<String>>>>,
    id: u32,
    lookup: impl FnOnce(&mut [u8]) -> Option<*const libc::c_char>,
) -> Option<String> {
    let mut cache = cache.lock().expect("name cache poisoned");
    cache
        .get_or_insert_with(HashMap::new)
        .entry(id)
        .or_insert_with(|| {
            let mut buf = vec![0u8; 4096];
            let name = lookup(&mut buf)?;
            // SAFETY: on success the name points into `buf`, NUL-terminated.
            Some(
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned(),
            )
        })
        .clone()
}

/// The name of user `uid`, cached.
pub fn user_name(uid: u32) -> Option<String> {
    cached_name(&USER_NAMES, uid, |buf| {
        // SAFETY: passwd is plain data; getpwuid_r writes into it and `buf`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the duration of the call.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc == 0 && !result.is_null()).then_some(pwd.pw_name as *const libc::c_char)
    })
}

/// The name of group `gid`, cached.
pub fn group_name(gid: u32) -> Option<String> {
    cached_name(&GROUP_NAMES, gid, |buf| {
        // SAFETY: group is plain data; getgrgid_r writes into it and `buf`.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the duration of the call.
        let rc = unsafe {
            libc::getgrgid_r(
                gid,
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        (rc == 0 && !result.is_null()).then_some(grp.gr_name as *const libc::c_char)
    })
}

/// True when `name` is a safe single path component: not empty, not `.` or
/// `..`, no `/` and no NUL. Restore refuses every other name, which is what
/// keeps a hostile snapshot from writing outside the target.
pub fn is_safe_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

/// `OsStr` from raw bytes.
pub fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}
