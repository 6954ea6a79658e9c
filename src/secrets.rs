//! Secrets come from the environment or from files (Docker/Kubernetes secrets), never from the config
//! file itself. The config names *where* a secret is; [`SecretRef::resolve`] reads it when a step
//! needs it, and the value's `Debug` never shows it.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// Where a secret lives: `{ env = "EZFOCUS_PASSWORD" }` or `{ file = "/run/secrets/ezfocus_password" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

/// The table form of a [`SecretRef`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    file: Option<PathBuf>,
}

/// What a secret field must look like, for every refusal.
const SECRET_FORM: &str = "write { env = \"NAME\" } or { file = \"/run/secrets/name\" }";

/// Only the table form is accepted. Anything else is refused with a message that does not repeat the
/// value: serde's own ("invalid type: string \"hunter2\", expected ...") would print a password
/// written into the config file into `check-config`'s output and every process's log.
impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RefVisitor;

        impl RefVisitor {
            fn refuse<E: de::Error>(what: &str) -> E {
                E::custom(format!(
                    "a secret must not be written as {what} in the config file; {SECRET_FORM}"
                ))
            }
        }

        impl<'de> Visitor<'de> for RefVisitor {
            type Value = SecretRef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SECRET_FORM)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretRef, E> {
                Err(Self::refuse("a literal string"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretRef, E> {
                Err(Self::refuse("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretRef, E> {
                Err(Self::refuse("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretRef, E> {
                Err(Self::refuse("a number"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretRef, E> {
                Err(Self::refuse("a boolean"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<SecretRef, A::Error> {
                Err(Self::refuse("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SecretRef, A::Error> {
                let t = SecretTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(SecretRef {
                    env: t.env,
                    file: t.file,
                })
            }
        }

        d.deserialize_any(RefVisitor)
    }
}

/// A secret value. Its `Debug` and `Display` print `***`, so it cannot leak into logs by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the one place that must send it (an auth header, a URL query).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl SecretRef {
    /// A secret in the environment variable `name`.
    pub fn env(name: impl Into<String>) -> Self {
        Self {
            env: Some(name.into()),
            file: None,
        }
    }

    /// A secret in the file at `path`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            env: None,
            file: Some(path.into()),
        }
    }

    /// Checks the reference itself (exactly one of env/file); the value is read later.
    pub fn check(&self) -> Result<(), String> {
        match (&self.env, &self.file) {
            (Some(e), None) if !e.is_empty() => Ok(()),
            (None, Some(f)) if !f.as_os_str().is_empty() => Ok(()),
            _ => Err("a secret needs exactly one of `env = \"NAME\"` or `file = \"/path\"`".into()),
        }
    }

    /// Reads the secret. Errors name the variable or file, never the value.
    pub fn resolve(&self) -> Result<Secret, String> {
        if let Some(name) = &self.env {
            return match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                Ok(_) => Err(format!("environment variable {name} is empty")),
                Err(_) => Err(format!("environment variable {name} is not set")),
            };
        }
        if let Some(path) = &self.file {
            let v = read_file(path, "secret file")?;
            // Secret files usually end with a newline that is not part of the secret.
            return match v.trim_end_matches(['\r', '\n']) {
                "" => Err(format!("secret file {} is empty", path.display())),
                v => Ok(Secret(v.to_string())),
            };
        }
        Err("a secret needs `env` or `file`".into())
    }
}

/// Reads a secret or token file (`what` names it in messages) after checking its permissions, as
/// libpq does for `.pgpass`: a file that other users can read, or that group or other users can
/// write, is refused; a group-readable one (a Kubernetes secret mounted with `fsGroup`) is read
/// with a warning. The mode is that of the opened file (symbolic links followed, as Kubernetes
/// mounts secrets), checked before a byte is read. Errors name the file, never its contents.
pub fn read_file(path: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    let mode = file
        .metadata()
        .map_err(|e| format!("cannot read {what} {shown}: {e}"))?
        .permissions()
        .mode();
    match check_mode(mode) {
        Access::Private => {}
        Access::GroupReadable => tracing::warn!(
            file = %shown,
            mode = format!("{:04o}", mode & 0o7777),
            "{what} {shown} is readable by its group (mode {:04o}); \
             if no group needs it, run chmod 600 {shown}",
            mode & 0o7777
        ),
        Access::Refused(why) => {
            return Err(format!(
                "{what} {shown} has mode {:04o}: {why}; \
                 run chmod 600 {shown} (or chmod 640 for a group that must read it)",
                mode & 0o7777
            ));
        }
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    Ok(text)
}

/// What the permission bits of a secret file allow.
#[derive(Debug, PartialEq, Eq)]
enum Access {
    Private,
    GroupReadable,
    Refused(&'static str),
}

fn check_mode(mode: u32) -> Access {
    if mode & 0o004 != 0 {
        Access::Refused("other users can read it")
    } else if mode & 0o022 != 0 {
        Access::Refused("users other than its owner can write it")
    } else if mode & 0o040 != 0 {
        Access::GroupReadable
    } else {
        Access::Private
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_from_env_and_file_and_never_shows_the_value() {
        // SAFETY: the variable name is unique to this test.
        unsafe { std::env::set_var("CRM_SYNC_TEST_SECRET_RESOLVE", "hunter2-value") };
        let s = SecretRef {
            env: Some("CRM_SYNC_TEST_SECRET_RESOLVE".into()),
            file: None,
        }
        .resolve()
        .unwrap();
        assert_eq!(s.expose(), "hunter2-value");
        assert!(!format!("{s:?} {s}").contains("hunter2"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        crate::private_fs::write_new(&path, b"from-file\n").unwrap();
        let s = SecretRef {
            env: None,
            file: Some(path),
        }
        .resolve()
        .unwrap();
        assert_eq!(s.expose(), "from-file");

        let missing = SecretRef {
            env: Some("CRM_SYNC_TEST_SECRET_MISSING".into()),
            file: None,
        }
        .resolve()
        .unwrap_err();
        assert_eq!(
            missing,
            "environment variable CRM_SYNC_TEST_SECRET_MISSING is not set"
        );
        assert!(
            SecretRef {
                env: Some("A".into()),
                file: Some("b".into())
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn secret_files_others_can_read_or_write_are_refused_and_group_readable_ones_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        crate::private_fs::write_new(&path, b"hunter2-value\n").unwrap();
        let chmod = |mode: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let file = SecretRef::file(&path);
        for (mode, why) in [
            (0o644, "other users can read it"),
            (0o604, "other users can read it"),
            (0o620, "users other than its owner can write it"),
            (0o602, "users other than its owner can write it"),
            (0o666, "other users can read it"),
        ] {
            chmod(mode);
            let err = file.resolve().unwrap_err();
            assert_eq!(
                err,
                format!(
                    "secret file {p} has mode {mode:04o}: {why}; run chmod 600 {p} \
                     (or chmod 640 for a group that must read it)",
                    p = path.display()
                )
            );
            assert!(!err.contains("hunter2"));
        }
        for mode in [0o600, 0o400, 0o640, 0o440, 0o700] {
            chmod(mode);
            assert_eq!(
                file.resolve().unwrap().expose(),
                "hunter2-value",
                "{mode:o}"
            );
        }
        assert_eq!(check_mode(0o640), Access::GroupReadable);
        assert_eq!(check_mode(0o100600), Access::Private);
    }
}
