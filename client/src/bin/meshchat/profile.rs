//! The profile directory: `profile.json` with the server, CA path and token.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What the CLI remembers between commands.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Profile {
    pub(crate) server: Option<String>,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) user_id: Option<u64>,
    pub(crate) user_name: Option<String>,
    pub(crate) token: Option<String>,
    pub(crate) expires_unix_ms: Option<u64>,
}

/// `--home`, else `MESHCHAT_HOME` (clap reads it), else `~/.meshchat`.
pub(crate) fn home(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(h) = given {
        return Ok(h);
    }
    let base = std::env::var_os("HOME").context("HOME is not set; pass --home DIR")?;
    Ok(PathBuf::from(base).join(".meshchat"))
}

impl Profile {
    fn path(home: &Path) -> PathBuf {
        home.join("profile.json")
    }

    /// The saved profile, or an empty one.
    pub(crate) fn load(home: &Path) -> anyhow::Result<Self> {
        match std::fs::read(Self::path(home)) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a meshchat profile", Self::path(home).display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).context("reading profile"),
        }
    }

    /// Saves the profile (owner-only permissions: it holds a token).
    pub(crate) fn save(&self, home: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
        let path = Self::path(home);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}
