//! Who this process is, for a person reading who holds a leader lock: the host (in Kubernetes the pod's name)
//! and the process id. Reads the kernel's host name; knows nothing about locks.

use std::fmt;

/// This process: where it runs and its pid.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The host name (a pod's name in Kubernetes).
    pub host: String,
    /// The process id on that host.
    pub pid: u32,
}

impl Identity {
    /// This process.
    pub fn current() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "unknown-host".to_owned());
        Self { host, pid: std::process::id() }
    }

    /// The Postgres `application_name` of a session of this process: `qx-relay <host> <pid>`, which
    /// [`Identity::from_application_name`] reads back.
    pub fn application_name(&self) -> String {
        format!("{APPLICATION} {} {}", self.host, self.pid)
    }

    /// The identity in an `application_name` written by [`Identity::application_name`].
    pub fn from_application_name(name: &str) -> Option<Self> {
        let mut parts = name.split(' ');
        match (parts.next(), parts.next(), parts.next().map(str::parse), parts.next()) {
            (Some(APPLICATION), Some(host), Some(Ok(pid)), None) => Some(Self { host: host.to_owned(), pid }),
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.host, self.pid)
    }
}

const APPLICATION: &str = "qx-relay";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_names_round_trip() {
        let me = Identity { host: "orders-7f9c-x2".into(), pid: 4242 };
        assert_eq!(me.application_name(), "qx-relay orders-7f9c-x2 4242");
        assert_eq!(Identity::from_application_name(&me.application_name()), Some(me));
        for other in ["psql", "qx-relay", "qx-relay h x", "qx-relay h 1 extra", "other h 1"] {
            assert_eq!(Identity::from_application_name(other), None, "{other}");
        }
    }

    #[test]
    fn this_process_has_a_host_and_its_pid() {
        let me = Identity::current();
        assert!(!me.host.is_empty() && !me.host.contains(char::is_whitespace), "{me:?}");
        assert_eq!(me.pid, std::process::id());
    }
}
