"""YAML from users and from experiment folders, parsed within bounds (hostile input is bad input).

A sweep spec is a few hundred YAML nodes. A few hundred bytes of nested aliases (`&a [*b, *b, ...]`)
expand to millions; anything that walks or prints the result (validation, error messages) then
takes minutes and megabytes. `load` counts what the document stands for, aliases expanded, from the
composed node graph before anything is constructed, and refuses past MAX_NODES.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_NODES = 100_000


def load(text: str) -> Any:
    """yaml.safe_load, refusing documents that expand past MAX_NODES nodes or refer to themselves.

    Raises:
        ValueError: Saying what is wrong (not YAML, with where; too many nodes; too deep; recursive).
    """
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters already (a NUL is a ReaderError)
        node = loader.get_single_node()
        if node is None:
            return None
        nodes = _expanded_nodes(node, {}, set())
        if nodes > MAX_NODES:
            raise ValueError(
                f"the YAML expands to more than {MAX_NODES:,} nodes through its aliases (&anchor / *alias); a sweep "
                "spec has a few hundred. Write the values out instead of nesting aliases"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise ValueError("the YAML nests too deeply; a sweep spec is a few levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many nodes `node` stands for with every alias expanded (a shared node counts once per use),
    capped just past MAX_NODES."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.YAMLError("an alias refers to a node that contains it (a recursive structure)")
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_nodes(k, sizes, open_nodes) + _expanded_nodes(v, sizes, open_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            total += _expanded_nodes(item, sizes, open_nodes)
    open_nodes.discard(key)
    sizes[key] = min(total, MAX_NODES + 1)
    return sizes[key]
