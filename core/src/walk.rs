//! Depth-first traversal of a snapshot's trees, shared by restore, `ls`,
//! `diff`, `check` and `dump`. Paths are byte strings starting with `/`,
//! because names on Linux need not be UTF-8.

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::repo::Repository;
use crate::tree::{Node, NodeKind};

/// Calls `f(path, node)` for every entry below `root`, parents before children,
/// siblings in name order.
pub fn walk(
    repo: &Repository,
    index: &Index,
    root: &Id,
    f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
) -> Result<()> {
    let mut path = Vec::new();
    walk_inner(repo, index, root, &mut path, f, 0)
}

fn walk_inner(
    repo: &Repository,
    index: &Index,
    tree_id: &Id,
    path: &mut Vec<u8>,
    f: &mut dyn FnMut(&[u8], &Node) -> Result<()>,
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
    let tree = repo.load_tree(index, tree_id)?;
    for node in &tree.nodes {
        let len = path.len();
        path.push(b'/');
        path.extend_from_slice(&node.name.0);
        f(path, node)?;
        if node.kind == NodeKind::Dir {
            if let Some(sub) = &node.subtree {
                walk_inner(repo, index, sub, path, f, depth + 1)?;
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
