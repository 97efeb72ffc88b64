//! Depth-first traversal of a snapshot's trees, shared by restore, `ls`,
//! `diff`, drills and `dump`. Paths are byte strings starting with `/`,
//! because names on Linux need not be UTF-8.
//!
//! Trees are content-addressed, so identical directories share one tree
//! and a snapshot's trees form a graph, not a tree: seventeen small trees
//! that each name the next twice expand to 131,071 directories. A walk
//! visits every path (a restore must write each copy), so it is bounded by
//! what the snapshot declares it holds ([`entry_limit`]) and refuses to go
//! on past it.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::repo::Repository;
use crate::tree::{Node, NodeKind, Snapshot};

/// Where [`walk_tolerant`] reports unreadable trees.
type ErrorSink<'a> = &'a mut dyn FnMut(&[u8], Error);

/// The most entries a walk of `snapshot` visits: twice what its summary
/// declares (files, directories and other entries; a backup counts each,
/// but not the parents of the paths it was given), plus 100,000. Beyond it
/// the snapshot's trees expand to more than any backup of what it declares
/// could have recorded.
pub fn entry_limit(snapshot: &Snapshot) -> u64 {
    let s = &snapshot.summary;
    s.files_new
        .saturating_add(s.files_changed)
        .saturating_add(s.files_unmodified)
        .saturating_add(s.dirs)
        .saturating_add(s.others)
        .saturating_mul(2)
        .saturating_add(100_000)
}

/// Calls `f(path, node)` for every entry of `snapshot`, parents before
/// children, siblings in name order.
pub fn walk(
    repo: &Repository,
    index: &Index,
    snapshot: &Snapshot,
    f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
) -> Result<()> {
    let mut w = Walk {
        repo,
        index,
        f,
        on_error: None,
        left: entry_limit(snapshot),
        path: Vec::new(),
    };
    w.tree(&snapshot.tree, 0)
}

/// Like [`walk`], but a tree that cannot be read is reported to
/// `on_error(directory path, error)` and skipped, so that damage to one
/// directory does not stop the traversal of the others.
pub fn walk_tolerant(
    repo: &Repository,
    index: &Index,
    snapshot: &Snapshot,
    f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
    on_error: &mut dyn FnMut(&[u8], Error),
) -> Result<()> {
    let mut w = Walk {
        repo,
        index,
        f,
        on_error: Some(on_error),
        left: entry_limit(snapshot),
        path: Vec::new(),
    };
    w.tree(&snapshot.tree, 0)
}

/// One walk in progress.
struct Walk<'a, 'f> {
    repo: &'a Repository,
    index: &'a Index,
    f: &'f mut dyn FnMut(&[u8], &Node) -> Result<()>,
    on_error: Option<ErrorSink<'f>>,
    /// Entries it may still visit.
    left: u64,
    path: Vec<u8>,
}

impl Walk<'_, '_> {
    fn tree(&mut self, tree_id: &Id, depth: usize) -> Result<()> {
        walk_inner(self, tree_id, depth)
    }
}

fn walk_inner(w: &mut Walk<'_, '_>, tree_id: &Id, depth: usize) -> Result<()> {
    // A hostile repository could build a cycle of trees (impossible with
    // honest content addressing, but cheap to refuse).
    if depth > 4096 {
        return Err(Error::corrupt(
            format!("tree {}", tree_id.short()),
            "directories nested more than 4096 deep",
        ));
    }
    let tree = match (w.repo.load_tree(w.index, tree_id), w.on_error.as_mut()) {
        (Ok(tree), _) => tree,
        (Err(e), Some(report)) => {
            report(if w.path.is_empty() { b"/" } else { &w.path }, e);
            return Ok(());
        }
        (Err(e), None) => return Err(e),
    };
    for node in &tree.nodes {
        if w.left == 0 {
            return Err(Error::corrupt(
                format!("tree {}", tree_id.short()),
                "the snapshot's trees expand to far more entries than it declares (directories that share trees without end); it was not walked further",
            ));
        }
        w.left -= 1;
        let len = w.path.len();
        w.path.push(b'/');
        w.path.extend_from_slice(&node.name.0);
        (w.f)(&w.path, node)?;
        if node.kind == NodeKind::Dir {
            if let Some(sub) = &node.subtree {
                walk_inner(w, sub, depth + 1)?;
            }
        }
        w.path.truncate(len);
    }
    Ok(())
}

/// Finds the node at `path` (e.g. `/etc/hosts`) in a snapshot.
pub fn find(repo: &Repository, index: &Index, root: &Id, path: &[u8]) -> Result<Option<Node>> {
    let mut tree = repo.load_tree(index, root)?;
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    for (i, comp) in comps.iter().enumerate() {
        let Some(node) = tree.find(comp).cloned() else {
            return Ok(None);
        };
        if i + 1 == comps.len() {
            return Ok(Some(node));
        }
        match (&node.kind, &node.subtree) {
            (NodeKind::Dir, Some(sub)) => tree = repo.load_tree(index, sub)?,
            _ => return Ok(None),
        }
    }
    Ok(None)
}
