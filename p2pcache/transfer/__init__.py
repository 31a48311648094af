"""Moving whole DAGs between peers: the sans-IO walk every DAG fetch shares (bitswap's and the DAG
transfer protocol's), and the order a DAG stream sends blocks in."""

from .walk import DagWalk, DfsOrder, OutOfOrder, WalkStats, dag_links

__all__ = ["DagWalk", "DfsOrder", "OutOfOrder", "WalkStats", "dag_links"]
