"""Undo for a graph rewrite that failed half-way.

The pattern matcher rewrites the graph one match at a time, in place; an
exception in the third replacement leaves two fused sites and a graph that may
no longer be consistent. A pass takes a snapshot before it rewrites and, on an
exception, puts the snapshot back into the same ``Graph`` object (the pass
manager and the owning GraphModule hold that object, not a copy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx
from torch.fx.graph import _Namespace


@dataclass(frozen=True)
class Snapshot:
    nodes: torch.fx.Graph
    # The names in use, so that later passes name their nodes as they would have.
    namespace: _Namespace


def _copy_nodes(source: torch.fx.Graph, target: torch.fx.Graph) -> None:
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in source.nodes:
        # node_copy keeps the name (when free) and a shallow copy of node.meta.
        env[node] = target.node_copy(node, env.__getitem__)


def snapshot(graph: torch.fx.Graph) -> Snapshot:
    saved = torch.fx.Graph(tracer_cls=graph._tracer_cls)
    _copy_nodes(graph, saved)
    namespace = copy.copy(graph._graph_namespace)
    namespace._obj_to_name = dict(namespace._obj_to_name)
    namespace._used_names = set(namespace._used_names)
    namespace._base_count = dict(namespace._base_count)
    return Snapshot(saved, namespace)


def restore(graph: torch.fx.Graph, saved: Snapshot) -> None:
    """Make ``graph`` what it was when ``saved`` was taken: same nodes, names and meta."""
    for node in reversed(list(graph.nodes)):
        node.users.clear()  # a half-done rewrite may leave users that are about to go too
        graph.erase_node(node)
    graph._graph_namespace = _Namespace()  # free names: the copies get their own back
    _copy_nodes(saved.nodes, graph)
    graph._graph_namespace = saved.namespace
