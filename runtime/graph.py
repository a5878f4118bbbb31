"""Who produces and who reads each tensor of an ONNX graph, and the orderings built on that.

One index and one topological sort for every graph pass: the exporter's rewrites, the quantizer's
passes, the onnxruntime variant's rewrite and the TensorRT lint. Imports onnx only (the runtime's
lowest layer, so quantize and exporter may use it).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import onnx


class GraphIndex:
    """Producer and readers of every tensor of a node list. A snapshot: build a new one after
    adding, removing or rewiring nodes.

    ``producer[name]`` is the node that outputs ``name``; ``consumers[name]`` the nodes that take it
    as an input, in node order, a node once per input slot that reads it (``Mul(x, x)`` twice)."""

    def __init__(self, nodes: Iterable[onnx.NodeProto]) -> None:
        self.nodes = list(nodes)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes reading ``tensor`` (an empty list for a tensor nothing reads)."""
        return self.consumers.get(tensor, [])


def toposort(nodes: Iterable[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``nodes`` in Kahn's order, stable: a node comes as early as its inputs allow, ties in list
    order (a sorted list comes back as it is). ``graph`` supplies what exists before any node runs:
    its inputs and initializers. ValueError naming the tensor when an input is produced by nothing,
    or the nodes left when they form a cycle."""
    nodes = list(nodes)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    index = GraphIndex(nodes)
    position = {id(node): i for i, node in enumerate(nodes)}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(node.input) - available:
            if name not in index.producer:
                raise ValueError(f"node {node.name or node.op_type!r} reads '{name}', which nothing produces")
            waiting[i] += 1
            users.setdefault(position[id(index.producer[name])], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for user in users.get(i, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(ordered) != len(nodes):
        stuck = [node.name or node.op_type for i, node in enumerate(nodes) if waiting[i]]
        raise ValueError(f"the graph has a cycle through {stuck[:3]}")
    return ordered


def sort_graph(graph: onnx.GraphProto) -> None:
    """Reorder ``graph``'s nodes in place with :func:`toposort` (onnx.checker wants producers
    before readers; rewrites and converters may append nodes at the end)."""
    ordered = toposort(graph.node, graph)
    del graph.node[:]
    graph.node.extend(ordered)


def live_nodes(nodes: Iterable[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes some output of ``graph`` still depends on, in their order."""
    nodes = list(nodes)
    producer = GraphIndex(nodes).producer
    seen: set[str] = set()
    live: set[int] = set()
    stack = [out.name for out in graph.output]
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(name for name in node.input if name)
    return [node for node in nodes if id(node) in live]
