"""accelerate launch (`python -m accelerate.commands.launch`): N processes on one machine or several."""

from collections.abc import Sequence

from launch import LaunchCommand, check_entry, check_positive, thread_env


def accelerate_command(
    python: str,
    entry: Sequence[str],
    num_processes: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    cpu: bool = True,
    threads: int | None = None,
) -> LaunchCommand:
    """accelerate launch starting `num_processes` ranks in all (over `num_machines` machines) of the module in `entry`.

    On CPU with several processes `accelerate launch --cpu` silently starts ONE process, so several
    CPU processes are started as `--multi_gpu` with ACCELERATE_USE_CPU=1 in the environment (MULTI_CPU
    over gloo once the worker builds `Accelerator(cpu=True)`). A single process gets `--cpu` instead:
    accelerate's one-process launcher overwrites ACCELERATE_USE_CPU from that flag.
    """
    entry = check_entry(entry, module_only=True)
    check_positive("num_processes", num_processes)
    check_positive("num_machines", num_machines)
    if num_processes % num_machines != 0:
        raise ValueError(
            f"num_processes counts the ranks on all machines and must be a multiple of num_machines; "
            f"got {num_processes} processes for {num_machines} machines"
        )
    if not 0 <= machine_rank < num_machines:
        raise ValueError(
            f"machine_rank must be in [0, {num_machines}) for {num_machines} machine(s), got {machine_rank}"
        )
    if main_process_port is not None and not 1 <= main_process_port <= 65535:
        raise ValueError(f"main_process_port must be in 1..65535, got {main_process_port}")

    argv = [python, "-m", "accelerate.commands.launch"]
    env = thread_env(threads)
    if num_processes > 1:
        argv += ["--multi_gpu"]
        if cpu:
            env["ACCELERATE_USE_CPU"] = "1"
    elif cpu:
        argv += ["--cpu"]
    argv += ["--num_processes", str(num_processes), "--num_machines", str(num_machines)]
    argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # both are set in code, not by the launcher
    if threads is not None:
        argv += ["--num_cpu_threads_per_process", str(threads)]
    if num_machines > 1:
        if main_process_ip is None or main_process_port is None:
            raise ValueError(
                f"a {num_machines}-machine accelerate launch needs main_process_ip and main_process_port "
                f"(the address of machine 0); got main_process_ip={main_process_ip!r}, "
                f"main_process_port={main_process_port!r}"
            )
        argv += ["--machine_rank", str(machine_rank), "--main_process_ip", main_process_ip]
        argv += ["--main_process_port", str(main_process_port)]
    elif main_process_port is not None:
        argv += ["--main_process_port", str(main_process_port)]
    argv += entry  # starts with "-m": accelerate's own --module flag, then the module and its arguments
    return LaunchCommand(argv=tuple(argv), env=env)
