//! Blocking reads from the cached repository; callers run them on tokio's blocking pool.

use gix::objs::tree::EntryKind;

use crate::Error;

/// Where a file lookup ended.
pub(crate) enum FileLookup {
    Found(Vec<u8>),
    /// No regular file at that path (missing, a directory, a symlink or a submodule).
    Missing,
    TooLarge {
        size: u64,
    },
}

/// Splits a repository-relative path into its segments, accepting `a/b`, `/a/b` and `./a//b`, and
/// rejecting `..` so nothing outside the tree can be addressed.
pub(crate) fn path_segments(path: &str) -> Result<Vec<&str>, Error> {
    let segments: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if segments.is_empty() || segments.contains(&"..") {
        return Err(Error::InvalidPath {
            path: path.to_owned(),
        });
    }
    Ok(segments)
}

/// The tree of `commit`, or `None` if the commit isn't in the repository.
fn commit_tree(
    repo: &gix::Repository,
    commit: gix::ObjectId,
) -> gix::Result<Option<gix::Tree<'_>>> {
    let Some(object) = repo.try_find_object(commit)? else {
        return Ok(None);
    };
    Ok(Some(object.try_into_commit()?.tree()?))
}

pub(crate) fn read_file(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    segments: &[&str],
    max_size: u64,
) -> gix::Result<Option<FileLookup>> {
    let Some(tree) = commit_tree(repo, commit)? else {
        return Ok(None);
    };
    let path: std::path::PathBuf = segments.iter().collect();
    let Some(entry) = tree.lookup_entry_by_path(&path)? else {
        return Ok(Some(FileLookup::Missing));
    };
    if !matches!(
        entry.mode().kind(),
        EntryKind::Blob | EntryKind::BlobExecutable
    ) {
        return Ok(Some(FileLookup::Missing));
    }
    // The header gives the size without inflating the blob, so huge files are never loaded.
    let size = repo.find_header(entry.object_id())?.size();
    if size > max_size {
        return Ok(Some(FileLookup::TooLarge { size }));
    }
    let blob = repo.find_object(entry.object_id())?;
    Ok(Some(FileLookup::Found(blob.detach().data)))
}

/// The regular files of a tree.
pub(crate) enum FileListing {
    /// `(path, size)`, sorted by path.
    Files(Vec<(String, u64)>),
    /// There are more than the allowed number of files.
    TooMany,
}

/// All regular files in the tree of `commit` with their sizes, or `None` if the commit isn't in the
/// repository. Symlinks and submodules are left out.
pub(crate) fn list_files(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    max_files: usize,
) -> gix::Result<Option<FileListing>> {
    let Some(tree) = commit_tree(repo, commit)? else {
        return Ok(None);
    };
    let mut recorder = gix::traverse::tree::Recorder::default();
    tree.traverse().breadthfirst(&mut recorder)?;
    let mut files = Vec::new();
    for entry in recorder.records {
        if !matches!(
            entry.mode.kind(),
            EntryKind::Blob | EntryKind::BlobExecutable
        ) {
            continue;
        }
        if files.len() == max_files {
            return Ok(Some(FileListing::TooMany));
        }
        let size = repo.find_header(entry.oid)?.size();
        files.push((entry.filepath.to_string(), size));
    }
    files.sort_unstable();
    Ok(Some(FileListing::Files(files)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(path_segments("a/b.yaml").unwrap(), ["a", "b.yaml"]);
        assert_eq!(path_segments("/a//./b").unwrap(), ["a", "b"]);
        assert!(path_segments("a/../b").is_err());
        assert!(path_segments("").is_err());
        assert!(path_segments("/").is_err());
    }
}
