//! Depth-first traversal of a snapshot's trees, shared by restore, `ls`,
//! `diff`, `check` and `dump`. Paths are byte strings starting with `/`,
//! because names on Linux need not be UTF-8.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::repo::Repository;
use crate::tree::{Node, NodeKind};

/// Where [`walk_tolerant`] reports unreadable trees.
type ErrorSink<'a> = &'a mut dyn FnMut(&[u8], Error);

/// Calls `f(path, node)` for every entry below `root`, parents before children,
/// siblings in name order.
pub fn walk(
    repo: &Repository,
    index: &Index,
    root: &Id,
    f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
) -> Result<()> {
    let mut path = Vec::new();
    walk_inner(repo, index, root, &mut path, f, &mut None, 0)
}

/// Like [`walk`], but a tree that cannot be read is reported to
/// `on_error(directory path, error)` and skipped, so that damage to one
/// directory does not stop the traversal of the others.
pub fn walk_tolerant(
    repo: &Repository,
    index: &Index,
    root: &Id,
    f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
    on_error: &mut dyn FnMut(&[u8], Error),
) -> Result<()> {
    let mut path = Vec::new();
    walk_inner(repo, index, root, &mut path, f, &mut Some(on_error), 0)
}

fn walk_inner(
    repo: &Repository,
    index: &Index,
    tree_id: &Id,
    path: &mut Vec<u8>,
    f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
    on_error: &mut Option<ErrorSink<'_>>,
    depth: usize,
) -> Result<()> {
    // A hostile repository could build a cycle of trees (impossible with
    // honest content addressing, but cheap to refuse).
    if depth > 4096 {
        return Err(Error::corrupt(
            format!("tree {}", tree_id.short()),
            "directories nested more than 4096 deep",
        ));
    }
    let tree = match (repo.load_tree(index, tree_id), on_error.as_mut()) {
        (Ok(tree), _) => tree,
        (Err(e), Some(report)) => {
            report(if path.is_empty() { b"/" } else { path }, e);
            return Ok(());
        }
        (Err(e), None) => return Err(e),
    };
    for node in &tree.nodes {
        let len = path.len();
        path.push(b'/');
        path.extend_from_slice(&node.name.0);
        f(path, node)?;
        if node.kind == NodeKind::Dir {
            if let Some(sub) = &node.subtree {
                walk_inner(repo, index, sub, path, f, on_error, depth + 1)?;
            }
        }
        path.truncate(len);
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
