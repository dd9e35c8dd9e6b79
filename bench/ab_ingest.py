"""C-STORE ingest of two source trees of the archive, interleaved: before and after a change.

    git worktree add /tmp/before <commit> --detach
    python bench/ab_ingest.py --a /tmp/before --b . --set qido --associations 4 --rounds 5

Each round starts a fresh archive (embedded defaults, its own data directory) from tree A,
sends one corpus set of `bench/corpus.py` with DCMTK's storescu over N associations, checks
that every instance arrived, stops it, then does the same from tree B; interleaving spreads the
machine's drift over both. A tree runs with this venv's Python (the same dependencies), its
own package and migrations. Prints instances per second of each round and the medians. Prints
figures; asserts nothing beyond every instance arriving.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import ours
import workloads
from corpus import SETS, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="tree A (before)")
    parser.add_argument("--b", type=Path, required=True, help="tree B (after)")
    parser.add_argument("--set", choices=sorted(SETS), default="qido")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/ricord-bench"))
    args = parser.parse_args()
    files = generate(args.work_dir / "corpus", 1234, log=lambda _: None)[args.set].files
    rates: dict[str, list[float]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="ab-", dir=args.work_dir) as work:
        os.chmod(work, 0o755)  # the embedded PostgreSQL runs as another user
        for round_ in range(args.rounds):
            for name, tree in (("A", args.a), ("B", args.b)):
                ours.REPO = tree.resolve()  # the archive starts with this tree as its cwd
                target = ours.Ours(Path(work))
                target.start()
                try:
                    seconds = workloads.storescu(target, files, args.associations)
                    stored = asyncio.run(workloads.count_instances(target))
                    if stored != len(files):
                        raise SystemExit(f"{name}: {stored} of {len(files)} instances stored")
                    rates[name].append(len(files) / seconds)
                finally:
                    target.cleanup()
                print(f"round {round_} {name}: {rates[name][-1]:.0f} inst/s "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\n{len(files)} instances of set {args.set!r}, {args.associations} association(s), "
          f"{args.rounds} rounds")
    for name, tree in (("A", args.a), ("B", args.b)):
        print(f"{name} {tree}: median {statistics.median(rates[name]):.0f} inst/s, "
              f"rounds {[round(r) for r in rates[name]]}")
    print(f"B / A: {statistics.median(rates['B']) / statistics.median(rates['A']):.3f}")


if __name__ == "__main__":
    main()
