//! Layout versions of the durable stores, as `callops migrate` reports them: what version a
//! store is at, this build's, and the numbered steps between them.

use std::fmt;

/// One numbered migration step, from the version before `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub to: i64,
    pub what: &'static str,
}

/// A store's version beside this build's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// None: the store is empty (or the file does not exist yet).
    pub found: Option<i64>,
    /// The version this build writes.
    pub current: i64,
    /// The steps an open would run, in order (empty when up to date, new or newer).
    pub steps: Vec<Step>,
}

impl SchemaStatus {
    /// The status of a store at `found`, given every step this build knows.
    pub fn new(found: Option<i64>, current: i64, all: impl IntoIterator<Item = Step>) -> Self {
        let steps = match found {
            Some(found) => all.into_iter().filter(|step| step.to > found).collect(),
            None => Vec::new(),
        };
        Self {
            found,
            current,
            steps,
        }
    }

    /// Written by a newer build: this one refuses it.
    pub fn is_newer(&self) -> bool {
        self.found.is_some_and(|found| found > self.current)
    }
}

impl SchemaStatus {
    /// What was found and what was done, once the steps ran.
    pub fn applied(&self) -> String {
        self.to_string().replacen("would migrate:", "migrated:", 1)
    }
}

impl fmt::Display for SchemaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.found {
            Some(found) => writeln!(f, "store version: {found}")?,
            None => writeln!(f, "store version: none (empty)")?,
        }
        writeln!(f, "this build's version: {}", self.current)?;
        match self.found {
            None => write!(
                f,
                "nothing to migrate: an empty store is created at version {}",
                self.current
            ),
            Some(_) if self.is_newer() => write!(f, "newer than this build: refused"),
            Some(found) if found == self.current => write!(f, "up to date"),
            Some(found) => {
                write!(f, "would migrate:")?;
                let mut from = found;
                for step in &self.steps {
                    write!(f, "\n  {from} -> {}: {}", step.to, step.what)?;
                    from = step.to;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_start_after_the_found_version_and_the_summary_says_what_happens() {
        let all = [
            Step { to: 2, what: "two" },
            Step {
                to: 3,
                what: "three",
            },
        ];
        let old = SchemaStatus::new(Some(1), 3, all.clone());
        assert_eq!(old.steps.len(), 2);
        assert_eq!(
            old.to_string(),
            "store version: 1\nthis build's version: 3\nwould migrate:\n  1 -> 2: two\n  2 -> 3: three"
        );
        let newer = SchemaStatus::new(Some(9), 3, all.clone());
        assert!(newer.is_newer() && newer.steps.is_empty());
        assert!(
            newer
                .to_string()
                .ends_with("newer than this build: refused")
        );
        assert!(
            SchemaStatus::new(Some(3), 3, all.clone())
                .to_string()
                .ends_with("up to date")
        );
        assert!(SchemaStatus::new(None, 3, all).steps.is_empty());
    }
}
