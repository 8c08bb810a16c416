"""``bpk bench`` and ``bpk info``: the benchmark's command line and the installation report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import atomic, distributed
from .backends import get_backend
from .cli_args import as_option, count, names
from .model import resolve_dtype


# ---------------------------------------------------------------------------- bpk bench
def rank_counts(text: str) -> list[int]:
    counts = [count(1)(part) for part in names(text)]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected process counts like 1,2, got {text!r}")
    return sorted(set(counts))


def thread_counts(text: str) -> list[int]:
    counts = [count(1)(part) for part in names(text)]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected thread counts like 2 or 1,2, got {text!r}")
    return sorted(set(counts))


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, peers
    from .backends import available_backends

    backends = args.backends or available_backends()
    for name in backends:
        as_option("--backends", get_backend, name)
    for dtype in args.dtypes:
        as_option("--dtypes", resolve_dtype, dtype)
    for peer in args.peers:
        if peer not in peers.PEERS:
            raise ValueError(f"--peers: unknown peer {peer!r}; valid peers: {', '.join(peers.PEERS)}")
    configs = [as_option("--configs", bench.parse_config, spec) for spec in args.configs]
    for path, option in ((args.json, "--json"), (args.plot, "--plot")):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"{option} {path}: folder {Path(path).parent} does not exist")
        if path is not None:  # before the benchmark runs, not after
            atomic.check_writable(path, what=f"{option} file")
    if args.quick:
        configs = [c.quick() for c in configs]
    if args.ranks:
        if args.threads is not None and len(args.threads) > 1:
            raise ValueError("--ranks takes one --threads count (threads per rank), got "
                             f"{','.join(map(str, args.threads))}")
        return _bench_ranks(args, backends, configs, args.threads[0] if args.threads else None)
    options = bench.BenchOptions(backends=list(backends), configs=configs, dtypes=args.dtypes,
                                 peers=args.peers, repeats=2 if args.quick else args.repeats,
                                 threads=args.threads)
    notes: list[str] = []
    results = bench.run(options, log=bench.log_to_stderr, notes=notes)
    machine = bench.machine_info(args.threads)
    counts = machine["threads"]
    counts = ",".join(map(str, counts)) if isinstance(counts, list) else counts
    print(f"{machine['cpu']}, {machine['cores']} cores, {counts} threads, "
          f"{machine['date']}", flush=True)
    print(bench.table(results), flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    if args.json:
        bench.write_json(args.json, bench.to_json(results, machine, notes))
    if args.plot:
        bench.plot(results, args.plot)
    return 0


def _bench_ranks(args: argparse.Namespace, backends: list[str], configs: list,
                 threads: int | None) -> int:
    """`bpk bench --ranks`: the scaling of data-parallel training over MPI process counts."""
    from . import bench
    if args.peers or args.plot:
        raise ValueError("--ranks times bpkernels itself under mpiexec; drop --peers and --plot")
    distributed.mpiexec_command(1)  # fails early, naming the extra, when there is no MPI
    results = bench.scaling_benchmark(backends, configs, args.dtypes, args.ranks,
                                      2 if args.quick else args.repeats, threads,
                                      log=bench.log_to_stderr)
    machine = bench.machine_info(threads or 1)
    print(f"{machine['cpu']}, {machine['cores']} cores, {threads or 1} thread(s) per rank, "
          f"{machine['date']}", flush=True)
    print(bench.scaling_table(results), flush=True)
    if args.json:
        bench.write_json(args.json, bench.to_json(results, machine))
    return 0


# ---------------------------------------------------------------------------- bpk info
def cmd_info(args: argparse.Namespace) -> int:
    from .info import collect_info, print_info
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str), flush=True)
    else:
        print_info(info)
    return 0
