"""torchrun (`python -m torch.distributed.run`): N processes per node on one node or several."""

from collections.abc import Sequence

from launch import LaunchCommand, check_entry, check_positive, thread_env


def torchrun_command(
    python: str,
    entry: Sequence[str],
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    max_restarts: int = 0,
    threads: int | None = None,
) -> LaunchCommand:
    """torchrun starting `nproc_per_node` ranks of the module in `entry`: standalone on one node, c10d across nodes."""
    entry = check_entry(entry, module_only=True)
    check_positive("nproc_per_node", nproc_per_node)
    check_positive("nnodes", nnodes)
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be 0 or more, got {max_restarts}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank must be in [0, {nnodes}) for {nnodes} node(s), got {node_rank}")

    argv = [python, "-m", "torch.distributed.run"]
    argv += ["--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node), "--max_restarts", str(max_restarts)]
    if nnodes == 1 and rdzv_endpoint is None:
        argv += ["--standalone"]
    else:
        if rdzv_endpoint is None or rdzv_id is None:
            raise ValueError(
                f"a {nnodes}-node torchrun needs both rdzv_endpoint (HOST:PORT of node 0) and rdzv_id "
                f"(the same job id on every node); got rdzv_endpoint={rdzv_endpoint!r}, rdzv_id={rdzv_id!r}"
            )
        check_host_port("rdzv_endpoint", rdzv_endpoint)
        argv += ["--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", rdzv_id]
        argv += ["--node_rank", str(node_rank)]
    argv += entry  # starts with "-m": torchrun's own --module flag, then the module and its arguments
    env = thread_env(threads)
    if max_restarts:
        # Restarted ranks must not share the rendezvous store with the ranks before them: its keys of the previous
        # round point them at dead peers ("Gloo connectFullMesh failed ... Connection refused"; pytorch#135712).
        env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return LaunchCommand(argv=tuple(argv), env=env)


def check_host_port(name: str, endpoint: str) -> None:
    """Raise ValueError unless `endpoint` reads HOST:PORT with a port in 1..65535."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{name} must read HOST:PORT (e.g. node0.cluster:29400), got {endpoint!r}")
