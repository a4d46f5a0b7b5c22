"""A Ray cluster over a set of nodes: each node's ``ray start`` flags, and waiting for them all.

The launchers start one ``ray start --block`` per node (the first is the head) and run the
driver once every node has joined. Each node gets its own ports (``LaunchConfig.node_ports``)
so several can share a host; each job also gives Ray its own ``--temp-dir``, because a
``ray start --head`` in the default one makes every plain ``ray.init()`` on that host join it.

    python -m trainers.launch.ray_cluster wait HOST:PORT NODES TIMEOUT_S

waits until NODES nodes are alive and exits 1 with the nodes seen when TIMEOUT_S pass.
"""

from __future__ import annotations

import socket
import sys
import time

from trainers.launch.config import LaunchConfig


def ray_start_flags(cfg: LaunchConfig, index: int) -> list[str]:
    """``ray start`` flags of node ``index`` (0 is the head), without address, IP or temp dir.

    Every value is a number or a fixed word, so a shell may split the joined flags safely.
    """
    flags = [f"--num-cpus={cfg.cpus_per_node}", f"--num-gpus={cfg.gpus_per_node}", "--disable-usage-stats"]
    flags += [f"--{flag}={port}" for flag, port in cfg.node_ports(index).items()]
    if index == 0:
        flags += ["--head", f"--port={cfg.ray_port}"]
        flags += (["--include-dashboard=true", f"--dashboard-port={cfg.dashboard_port}"]
                  if cfg.dashboard_port is not None else ["--include-dashboard=false"])
    return flags


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node["Alive"]]


def wait_for_nodes(address: str, count: int, timeout_s: float, poll_s: float = 1.0) -> list[dict]:
    """Connects to the cluster at ``address`` and waits until ``count`` nodes are alive.

    Bounded: raises TimeoutError naming launch.join_timeout_s and the nodes that did join.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    host, port = address.rsplit(":", 1)
    # ray.init retries a head that is not up yet for minutes: wait for its port first.
    while not _accepts(host, int(port)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray head listens at {address} within launch.join_timeout_s={timeout_s:g} s")
        time.sleep(poll_s)
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        while len(nodes := alive_nodes()) < count:
            if time.monotonic() > deadline:
                seen = ", ".join(f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}" for n in nodes)
                raise TimeoutError(f"{len(nodes)} of {count} Ray nodes joined {address} within "
                                   f"launch.join_timeout_s={timeout_s:g} s: {seen or 'none'}")
            time.sleep(poll_s)
        return nodes
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "wait":
        print(__doc__, file=sys.stderr)
        return 2
    try:
        nodes = wait_for_nodes(argv[1], int(argv[2]), float(argv[3]))
    except TimeoutError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    print(f"all {len(nodes)} Ray nodes joined {argv[1]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
