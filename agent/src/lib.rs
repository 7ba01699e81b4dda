//! The provider agent: operator CLI, stores, and (later) the daemon.
