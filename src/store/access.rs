//! Who may open the database file: a refusal names the file, its owner and mode, and the user
//! edgechat runs as (a bare "Permission denied" after a restore run as root leaves an operator
//! guessing); a restore gives the new file the owner and mode of the one it replaces.

use super::StoreError;
use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The error for a database file this process may not open for writing, if it may not.
pub(super) fn denied(path: &Path) -> Option<StoreError> {
    let err = std::fs::OpenOptions::new().read(true).write(true).open(path).err()?;
    if err.kind() != std::io::ErrorKind::PermissionDenied {
        return None;
    }
    let file = match std::fs::metadata(path) {
        Ok(m) => {
            format!("is owned by {} with mode {:04o}", who(m.uid(), m.gid()), m.mode() & 0o7777)
        }
        Err(_) => "cannot even be inspected".into(),
    };
    // SAFETY: these calls only read the process's credentials.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    Some(StoreError::Db(format!(
        "{}: permission denied: the file {file}, and edgechat runs as {}; give it to that user \
         (chown), or run edgechat as its owner",
        path.display(),
        who(uid, gid)
    )))
}

/// Gives `path` the owner, group and permission bits of `like` (a restore as root must not
/// leave the service's database owned by root).
pub(super) fn copy_owner(path: &Path, like: &Metadata, mode: u32) -> std::io::Result<()> {
    let now = std::fs::metadata(path)?;
    if (now.uid(), now.gid()) != (like.uid(), like.gid()) {
        std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// `uid 0 (root), gid 0`: the number, and the name when the system knows it.
fn who(uid: u32, gid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("uid {uid} ({name}), gid {gid}"),
        None => format!("uid {uid}, gid {gid}"),
    }
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both ours and sized as passed; the name
    // it points to lives in `buf`, read before `buf` is dropped.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found);
        if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned())
    }
}
