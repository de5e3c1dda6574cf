//! owned by the git-http helper
