//! Where `leg_add` may open or create `file://` legs (`[rpc] leg_dirs`). The RPC socket is
//! root's (0600), but a leg URI names any path and `?create=` makes the file: limiting it to a
//! few directories keeps a typo or a stolen socket from overwriting `/etc` or another
//! volume's images. Paths are canonicalized (symbolic links and `..` resolved) before the
//! check, so no spelling escapes the allowed directories.

use std::path::{Path, PathBuf};

use nvmirror_nvme::uri::LegUri;

use crate::config::{absolute, Config};

/// The directories `leg_add` may use, canonical: `[rpc] leg_dirs` when set, else the data
/// directory and the directories of every configured `file://` leg. A directory that does not
/// exist (yet) is left out, with a warning.
pub fn allowed(cfg: &Config) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = match cfg.rpc.as_ref().and_then(|r| r.leg_dirs.clone()) {
        Some(dirs) => dirs,
        None => std::iter::once(cfg.data_dir.clone())
            .chain(
                cfg.volumes
                    .iter()
                    .flat_map(|v| v.legs.iter())
                    .filter_map(|uri| file_path(uri))
                    .filter_map(|p| p.parent().map(Path::to_path_buf)),
            )
            .collect(),
    };
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        match absolute(&d).canonicalize() {
            Ok(c) if !out.contains(&c) => out.push(c),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "[rpc] leg_dirs: directory left out")
            }
        }
    }
    out
}

/// The path of a `file://` leg URI; `None` for any other kind.
fn file_path(uri: &str) -> Option<PathBuf> {
    if !uri.starts_with("file://") {
        return None;
    }
    match LegUri::parse(uri) {
        Ok(LegUri::Uring { path, .. }) => Some(path),
        _ => None,
    }
}

/// Refuses a `file://` URI whose file is outside `allowed` (other URIs pass). The message
/// names the field and the allowed directories.
pub fn check(uri: &str, allowed: &[PathBuf]) -> Result<(), String> {
    let Some(path) = file_path(uri) else {
        return Ok(());
    };
    let list = || {
        allowed
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let refuse = |why: String| {
        Err(format!(
            "uri: {why}; [rpc] leg_dirs allows file:// legs only in: {}",
            list()
        ))
    };
    let canonical = match path.canonicalize() {
        Ok(c) => c,
        // Not there yet (`?create=`): its directory must be, and the name must be a name.
        Err(_) => {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return refuse(format!("{} is not a file path", path.display()));
            };
            match dir.canonicalize() {
                Ok(d) => d.join(name),
                Err(e) => return refuse(format!("directory {}: {e}", dir.display())),
            }
        }
    };
    if allowed.iter().any(|d| canonical.starts_with(d)) {
        Ok(())
    } else {
        refuse(format!(
            "{} ({}) is outside the allowed directories",
            path.display(),
            canonical.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_inside_the_allowed_dirs_pass_whatever_the_spelling() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let ok = root.join("legs");
        let other = root.join("other");
        std::fs::create_dir_all(&ok).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let allowed = [ok.clone()];
        let uri = |p: &Path| format!("file://{}?create=1MiB", p.display());
        assert_eq!(check(&uri(&ok.join("new.img")), &allowed), Ok(()));
        // `..` out of the allowed directory, a link pointing out, a missing directory.
        let err = check(&uri(&ok.join("../other/x.img")), &allowed).unwrap_err();
        assert!(
            err.starts_with("uri: ") && err.contains("leg_dirs"),
            "{err}"
        );
        assert!(err.contains(&ok.display().to_string()), "{err}");
        std::os::unix::fs::symlink(other.join("t.img"), ok.join("link.img")).unwrap();
        std::fs::write(other.join("t.img"), b"").unwrap();
        assert!(check(&uri(&ok.join("link.img")), &allowed).is_err());
        assert!(check(&uri(&root.join("nope/x.img")), &allowed).is_err());
        assert!(check(&uri(&other.join("x.img")), &allowed).is_err());
        // Other kinds of leg are not paths on this machine.
        assert_eq!(check("mem://1MiB", &allowed), Ok(()));
    }
}
