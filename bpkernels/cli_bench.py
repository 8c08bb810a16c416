"""``bpk bench`` and ``bpk info``: the benchmark's command line and the installation report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import atomic, distributed
from .backends import get_backend
from .cli_args import as_option, count, names
from .model import PRECISIONS, resolve_dtype


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


def add_bench_parser(commands) -> None:
    """``bpk bench``'s options, on the ``bpk`` parser's subcommands."""
    bench = commands.add_parser(
        "bench", help="epochs/s and parity of every backend and peer, with the GEMM floor",
        description="Time training epochs of each backend (and peers) on the benchmark configs, "
                    "beside the GEMM floor timed in the same run, and check each against the "
                    "float64 NumPy reference. After one warm-up epoch each, the floor, the "
                    "backends and the peers of a config and dtype take turns epoch by epoch "
                    "for --repeats rounds; s/epoch is each one's median. 'x floor' (epoch "
                    "time over the floor's) and 'x torch' (epochs/s over PyTorch's) are "
                    "computed within each round and their median is shown, so load that comes "
                    "and goes weighs on both sides of a ratio alike. --training adds training "
                    "variants, each timed in the same turns as plain SGD and reported as "
                    "epochs/s relative to it.")
    bench.add_argument("--backends", type=names, default=None, metavar="LIST",
                       help="comma list (default: every available backend)")
    bench.add_argument("--configs", type=names, default=["S", "M", "L"], metavar="LIST",
                       help="S, M, L, M+reg or layers:batch:samples like "
                            "784-256-10:128:60000; +reg after any (S+reg, ...) adds LayerNorm "
                            "and dropout 0.1 to each hidden layer (default: S,M,L)")
    bench.add_argument("--dtypes", type=names, default=["float32"], metavar="LIST",
                       help=f"comma list of {', '.join(PRECISIONS)} (default: float32)")
    bench.add_argument("--peers", type=names, default=[], metavar="LIST",
                       help="torch, jax, sklearn: the same runs by PyTorch, JAX (entries jax: "
                            "a jitted step per batch, and jax-scan: the epoch as one lax.scan; "
                            "on the threads XLA started with) and scikit-learn, skipped with a "
                            "note when not installed (default: none)")
    bench.add_argument("--repeats", type=count(1), default=5, metavar="N",
                       help="timed rounds: epochs per entry (default: 5)")
    bench.add_argument("--threads", type=thread_counts, default=None, metavar="LIST",
                       help="BLAS, Numba and torch threads: a count, or counts like 1,2 to time "
                            "every entry with each (epochs interleaved) and report the speedup "
                            "over the fewest (default: as the libraries choose)")
    bench.add_argument("--training", type=names, default=["sgd"], metavar="LIST",
                       help="sgd, cosine-clip: how the backends train; cosine-clip adds a "
                            "per-step cosine schedule over 20 epochs and clip_grad_norm=1.0 "
                            "to SGD, timed beside plain SGD (always timed) and shown as "
                            "epochs/s relative to it; peers train plain SGD only "
                            "(default: sgd)")
    bench.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    bench.add_argument("--plot", default=None, metavar="PATH", help="write a PNG bar chart")
    bench.add_argument("--quick", action="store_true",
                       help="a few batches per config and 2 repeats: a smoke test, not numbers")
    bench.add_argument("--ranks", type=rank_counts, default=None, metavar="LIST",
                       help="MPI process counts like 1,2: time data-parallel training under "
                            "mpiexec for each and report samples/s and scaling efficiency "
                            "(--threads per rank, default 1; needs bpkernels[mpi])")
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench, peers
    from .backends import available_backends

    backends = args.backends or available_backends()
    for name in backends:
        as_option("--backends", get_backend, name)
    for dtype in args.dtypes:
        as_option("--dtypes", resolve_dtype, dtype)
    args.dtypes = [resolve_dtype(dtype).name for dtype in args.dtypes]  # (bfloat16: bf16)
    for training in args.training:
        as_option("--training", bench.check_training, training)
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
        if set(args.training) != {"sgd"}:
            raise ValueError("--ranks times plain SGD only; drop --training")
        if args.threads is not None and len(args.threads) > 1:
            raise ValueError("--ranks takes one --threads count (threads per rank), got "
                             f"{','.join(map(str, args.threads))}")
        return _bench_ranks(args, backends, configs, args.threads[0] if args.threads else None)
    options = bench.BenchOptions(backends=list(backends), configs=configs, dtypes=args.dtypes,
                                 peers=args.peers, repeats=2 if args.quick else args.repeats,
                                 threads=args.threads, training=args.training)
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
