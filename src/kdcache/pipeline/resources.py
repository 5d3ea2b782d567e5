"""What a shard actor asks Ray for by default: on GPU nodes, its share of the node's CPUs.

A GPU actor's data path (reading, decoding and replaying the views:
:mod:`kdcache.pipeline.datapath`) runs on the actor's CPUs, and one CPU cannot feed a modern GPU;
so unless ``ray.cpus_per_actor`` is set, each GPU actor reserves the CPUs that come with its GPUs
on a node: the node's CPUs divided by its GPUs, times the actor's GPUs, the smallest share over
the cluster's GPU nodes (so every node can hold as many actors as it has GPUs). CPU actors
reserve one CPU.
"""

from __future__ import annotations

import logging
import math

import ray

logger = logging.getLogger(__name__)


def default_cpus_per_actor(gpus_per_actor: float) -> float:
    """CPUs per shard actor when ``ray.cpus_per_actor`` is unset (Ray must be initialised)."""
    if gpus_per_actor <= 0:
        return 1.0
    share = cpu_share(ray.nodes(), gpus_per_actor)
    if share is None:  # GPU nodes the autoscaler has not started yet: their size is unknown
        logger.warning(
            "no GPU node is up to size the actors' CPU share from: each GPU actor reserves 1 CPU "
            "(set ray.cpus_per_actor to the CPUs per GPU of the nodes to come)"
        )
        return 1.0
    return share


def cpu_share(nodes: list[dict], gpus_per_actor: float) -> float | None:
    """A GPU actor's share of CPUs on the live GPU nodes of ``nodes`` (as ``ray.nodes()`` lists
    them): CPUs over GPUs times ``gpus_per_actor``, the smallest over the nodes, whole and at
    least 1; None without a live GPU node."""
    shares = [
        float(node["Resources"].get("CPU", 0)) * gpus_per_actor / float(node["Resources"]["GPU"])
        for node in nodes
        if node.get("Alive") and node.get("Resources", {}).get("GPU", 0) > 0
    ]
    return float(max(1, math.floor(min(shares)))) if shares else None


def cpus_per_actor(configured: float | None, gpus_per_actor: float) -> float:
    """``ray.cpus_per_actor`` as set, else :func:`default_cpus_per_actor`."""
    return configured if configured is not None else default_cpus_per_actor(gpus_per_actor)
