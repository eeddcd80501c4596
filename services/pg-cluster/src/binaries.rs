use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use crate::Error;

/// Where the PostgreSQL server binaries live, and which user runs them.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    bin_dir: PathBuf,
    /// `Some((uid, gid))` of the `postgres` user when we are root, since the server refuses root.
    run_as: Option<(u32, u32)>,
}

impl PgBinaries {
    /// Finds the binaries: `$WAYBILL_PG_BINDIR`, then `initdb` on PATH, then the newest
    /// `/usr/lib/postgresql/<version>/bin` (Debian puts them there, off PATH).
    pub fn locate() -> Result<Self, Error> {
        let bin_dir = Self::find_bin_dir().ok_or(Error::BinariesNotFound)?;
        let run_as = if rustix::process::geteuid().is_root() {
            Some(postgres_user_ids()?)
        } else {
            None
        };
        Ok(Self { bin_dir, run_as })
    }

    fn find_bin_dir() -> Option<PathBuf> {
        let has_tools = |dir: &Path| {
            ["initdb", "pg_ctl", "pg_basebackup"]
                .iter()
                .all(|tool| dir.join(tool).is_file())
        };
        if let Some(dir) = env::var_os("WAYBILL_PG_BINDIR") {
            let dir = PathBuf::from(dir);
            return has_tools(&dir).then_some(dir);
        }
        if let Some(path) = env::var_os("PATH")
            && let Some(dir) = env::split_paths(&path).find(|dir| has_tools(dir))
        {
            return Some(dir);
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                has_tools(&bin).then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    }

    /// The folder holding `initdb`, `pg_ctl` and friends.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The uid and gid the server runs as, when that is not us.
    pub fn run_as(&self) -> Option<(u32, u32)> {
        self.run_as
    }

    /// A command for one of the server binaries, run as the right user.
    pub(crate) fn command(&self, tool: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(tool));
        self.drop_privileges(&mut command);
        command
    }

    /// Makes `command` run as the server's user when we are root.
    pub fn drop_privileges(&self, command: &mut Command) {
        use std::os::unix::process::CommandExt;
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
            // Root's HOME is unreadable for `postgres`; initdb and psql look at it.
            command.env("HOME", "/tmp");
        }
    }

    /// Hands `path` to the server's user when we are root.
    pub(crate) fn chown(&self, path: &Path) -> Result<(), Error> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(Error::io(format!("chown {} to postgres", path.display())))?;
        }
        Ok(())
    }
}

fn postgres_user_ids() -> Result<(u32, u32), Error> {
    let id = |flag: &str| -> Result<u32, Error> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(Error::io("run `id postgres`"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(Error::NoPostgresUser(
                String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            ));
        }
        text.trim()
            .parse()
            .map_err(|_| Error::NoPostgresUser(format!("`id {flag} postgres` printed {text:?}")))
    };
    Ok((id("-u")?, id("-g")?))
}
