//! Sandbox and job states, and the only transitions allowed between them. The names
//! are the Go predecessor's, so operators recognise them.

use serde::{Deserialize, Serialize};

macro_rules! state_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state_enum!(
    /// Where a sandbox (one VM) is in its life.
    SandboxState {
        Requested => "REQUESTED",
        Provisioning => "PROVISIONING",
        Booting => "BOOTING",
        Ready => "READY",
        Running => "RUNNING",
        Completed => "COMPLETED",
        Failed => "FAILED",
        Timeout => "TIMEOUT",
        Stopped => "STOPPED",
        Destroyed => "DESTROYED",
    }
);

state_enum!(
    /// Where a job is in its life.
    JobState {
        Queued => "QUEUED",
        Running => "RUNNING",
        Completed => "COMPLETED",
        Failed => "FAILED",
        Timeout => "TIMEOUT",
    }
);

impl SandboxState {
    /// Whether `self → to` is allowed.
    pub fn can_become(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Requested, Provisioning | Failed | Destroyed)
                | (Provisioning, Booting | Failed)
                | (Booting, Ready | Failed | Timeout)
                | (Ready, Running | Failed | Stopped)
                | (Running, Completed | Failed | Timeout | Stopped)
                | (Completed | Failed | Timeout, Stopped | Destroyed)
                | (Stopped, Destroyed)
        )
    }

    /// No VM exists any more.
    pub fn is_final(self) -> bool {
        self == SandboxState::Destroyed
    }
}

impl JobState {
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!((self, to), (Queued, Running | Failed | Timeout) | (Running, Completed | Failed | Timeout))
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in SandboxState::ALL {
            assert_eq!(SandboxState::parse(s.as_str()), Some(*s));
        }
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(*s));
        }
        assert_eq!(JobState::parse("DONE"), None);
    }

    #[test]
    fn destroyed_and_terminal_jobs_go_nowhere() {
        for to in SandboxState::ALL {
            assert!(!SandboxState::Destroyed.can_become(*to));
        }
        for from in [JobState::Completed, JobState::Failed, JobState::Timeout] {
            for to in JobState::ALL {
                assert!(!from.can_become(*to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn the_happy_path_is_allowed_and_skipping_is_not() {
        use SandboxState::*;
        let path = [Requested, Provisioning, Booting, Ready, Running, Completed, Stopped, Destroyed];
        for pair in path.windows(2) {
            assert!(pair[0].can_become(pair[1]), "{} -> {}", pair[0], pair[1]);
        }
        assert!(!Requested.can_become(Running));
        assert!(!Booting.can_become(Completed));
        assert!(!Completed.can_become(Running));
        assert!(JobState::Queued.can_become(JobState::Failed));
        assert!(!JobState::Queued.can_become(JobState::Completed));
    }
}
