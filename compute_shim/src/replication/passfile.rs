//! Postgres's password file (`~/.pgpass`, `PGPASSFILE`, `passfile=`): so a
//! password never has to be in the shim's command line. One entry per
//! line, `hostname:port:database:username:password`; `*` matches anything,
//! `\:` and `\\` are a literal colon and backslash, `#` starts a comment;
//! the first matching line wins (libpq's rules). A physical replication
//! connection matches the database field `replication`, as in libpq.

use std::path::{Path, PathBuf};

/// The database name a replication connection is looked up under.
pub const REPLICATION_DATABASE: &str = "replication";

/// Where to look when the connection string names no file: `PGPASSFILE`,
/// else `~/.pgpass`.
pub fn default_location(pgpassfile: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    match pgpassfile {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => home.filter(|home| !home.is_empty()).map(|home| Path::new(home).join(".pgpass")),
    }
}

/// The password of the first entry matching the connection.
pub fn lookup(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    text.lines().filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty()).find_map(|line| {
        let fields = split_fields(line)?;
        let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        let [host_pattern, port_pattern, database_pattern, user_pattern, password] = &fields[..] else {
            return None;
        };
        (matches(host_pattern, host)
            && matches(port_pattern, &port)
            && matches(database_pattern, database)
            && matches(user_pattern, user))
        .then(|| password.clone())
    })
}

/// The five fields of a line, unescaped; `None` for a line with fewer.
/// Colons in the password field itself need no escape (everything after
/// the fourth separator is the password).
fn split_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

/// Whether the file's mode lets others read it: libpq then ignores it
/// (with a warning), and so do we.
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|metadata| metadata.permissions().mode() & 0o077 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# the shim's entries\n\
        db1:5432:replication:shim:first\\:pass\n\
        *:5432:*:shim:wildcard\n\
        127.0.0.1:*:replication:other:with:colons\n\
        broken line\n";

    #[test]
    fn the_first_matching_entry_wins() {
        assert_eq!(lookup(FILE, "db1", 5432, REPLICATION_DATABASE, "shim").as_deref(), Some("first:pass"));
        assert_eq!(lookup(FILE, "db2", 5432, REPLICATION_DATABASE, "shim").as_deref(), Some("wildcard"));
        assert_eq!(lookup(FILE, "127.0.0.1", 6000, REPLICATION_DATABASE, "other").as_deref(), Some("with:colons"));
        assert_eq!(lookup(FILE, "db1", 5433, REPLICATION_DATABASE, "shim"), None);
        assert_eq!(lookup(FILE, "db1", 5432, REPLICATION_DATABASE, "nobody"), None);
        assert_eq!(lookup("", "db1", 5432, REPLICATION_DATABASE, "shim"), None);
    }

    #[test]
    fn the_file_is_found_as_libpq_finds_it() {
        assert_eq!(default_location(Some("/etc/shim.pgpass"), Some("/root")), Some(PathBuf::from("/etc/shim.pgpass")));
        assert_eq!(default_location(None, Some("/home/shim")), Some(PathBuf::from("/home/shim/.pgpass")));
        assert_eq!(default_location(Some(""), None), None);
    }

    proptest::proptest! {
        /// Any file text is looked up without a panic.
        #[test]
        fn any_text_is_safe(text in ".{0,300}") {
            let _ = lookup(&text, "h", 1, REPLICATION_DATABASE, "u");
        }
    }
}
