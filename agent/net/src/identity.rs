//! The provider's libp2p identity: an ed25519 keypair kept in `<data>/identity.key`.
//!
//! The key *is* the provider: its peer id is what requestors address, and receipts are
//! signed with it. So the file is created once (mode 0600 from the first byte, written
//! atomically) and afterwards only read; a key file others can read is refused rather
//! than used, because a leaked key lets anyone impersonate the provider.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use super::NetError;

/// Loads the keypair at `path`, or creates (and stores) a new ed25519 one if there is no
/// file yet.
///
/// Refuses a file that is readable or writable by group or others, one that does not
/// decode as a protobuf-encoded keypair, and one that holds a key type other than ed25519.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, NetError> {
    match File::open(path) {
        Ok(file) => load(path, file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(source) => Err(NetError::IdentityIo {
            action: "open",
            path: path.to_owned(),
            source,
        }),
    }
}

fn load(path: &Path, mut file: File) -> Result<Keypair, NetError> {
    let io = |action: &'static str| {
        move |source| NetError::IdentityIo {
            action,
            path: path.to_owned(),
            source,
        }
    };
    // fstat the descriptor we read from, not the path, so a swap between the check and the
    // read cannot slip a different file past the check.
    let mode = file.metadata().map_err(io("stat"))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(NetError::IdentityPermissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io("read"))?;
    let keypair =
        Keypair::from_protobuf_encoding(&bytes).map_err(|e| NetError::IdentityMalformed {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if keypair.key_type() != libp2p::identity::KeyType::Ed25519 {
        return Err(NetError::IdentityMalformed {
            path: path.to_owned(),
            detail: format!("it holds a {:?} key, not ed25519", keypair.key_type()),
        });
    }
    Ok(keypair)
}

/// Writes a fresh key beside `path` and links it into place.
///
/// `hard_link` instead of `rename`: link fails if the target exists, so two first runs
/// racing each other cannot both believe they own a different identity; the loser loads
/// the winner's key.
fn create(path: &Path) -> Result<Keypair, NetError> {
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| NetError::IdentityMalformed {
            path: path.to_owned(),
            detail: format!("a freshly generated key does not encode: {e}"),
        })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The new peer id makes the name unique even between threads of one process, so
    // `create_new` never trips over another writer's temp file.
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        keypair.public().to_peer_id()
    ));
    let io = |action: &'static str, p: PathBuf| {
        move |source| NetError::IdentityIo {
            action,
            path: p,
            source,
        }
    };
    let written = (|| {
        // 0600 at creation: a chmod afterwards would leave a window where the secret key
        // sits in a file others may open.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", tmp.clone()))?;
        f.write_all(&bytes).map_err(io("write", tmp.clone()))?;
        f.sync_all().map_err(io("fsync", tmp.clone()))
    })();
    let linked = written.and_then(|()| match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io("link", path.to_owned())(e)),
    });
    let _ = fs::remove_file(&tmp);
    if !linked? {
        // Another process created the identity first: use that one.
        let file = File::open(path).map_err(io("open", path.to_owned()))?;
        return load(path, file);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir.to_owned()))?;
    tracing::info!(
        path = %path.display(),
        peer = %keypair.public().to_peer_id(),
        "created a new identity"
    );
    Ok(keypair)
}
