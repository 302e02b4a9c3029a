"""W8 of BENCHMARKS.md: what secure aggregation (``--secagg``) costs over HTTP.

A real ``fedlearn server`` process (digits, ``mlp``: 17,226 values; FedAvg,
every client sampled each round, seed 0) and N clients running the real client
loop (``run_worker`` with ``RemoteServer``: register, poll, train one local epoch
on its IID share of digits, send its update) on 127.0.0.1. A client process
per client would not fit this machine at N = 100, so the clients run as
threads in a few worker processes (``--procs``), one torch thread each. Each
client's HTTP transport counts the bytes of every request and response body.

Modes:

- ``plain``: no ``--secagg``: each client uploads its delta (safetensors).
- ``secagg``: ``--secagg`` (complete graph, threshold a majority, 48-bit ring):
  each client trains, then runs the four stages (keys, shares, masked vector,
  unmask shares).
- ``secagg-drop``: as ``secagg``, and 10% of the clients (at least one) drop
  right after their masked upload: they never answer the unmask stage, so the
  server waits ``--secagg-timeout`` for them and then removes their self-masks
  with the survivors' shares (their inputs stay in the sum). Two alternating
  groups drop (A in odd rounds, B in even ones), because a client that dropped
  is left out of the next round's sample.
- ``secagg-k10`` (not run by default; ``--modes secagg-k10``): as ``secagg``
  with ``--secagg-neighbours 10``: each client masks and shares with 10
  neighbours on a random ring instead of with all N − 1 others.

Reported per (N, mode): the median seconds per round (the server's round
record, rounds 2..R: training and aggregation), the seconds from the end of
training to the sum (``secagg_seconds``), the server's unmasking compute
(``secagg_unmask_seconds``), the server's CPU seconds per round, and the body
bytes per round, over all clients and per client (up and down).

    nice -n 10 python benchmarks/w8_secagg.py                  # N = 10, 50, 100
    nice -n 10 python benchmarks/w8_secagg.py --sizes 10,50
    nice -n 10 python benchmarks/w8_secagg.py --quick          # N = 6, 2 rounds

Results of earlier invocations with the same rounds, timeout and processes are
kept in the JSON (so the sizes can be run one at a time), newer ones replacing
older ones of the same N and mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json

MODES = ("plain", "secagg", "secagg-drop", "secagg-k10")
#: ``--secagg-neighbours`` of the sparse (SecAgg+) mode.
SPARSE_NEIGHBOURS = 10
START_TIMEOUT = 120.0
HERE = Path(__file__).resolve()


# -- the server ---------------------------------------------------------------------
def start_server(run: Path, n: int, rounds: int, mode: str, stage_timeout: float,
                 log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``fedlearn server`` on a free port; (process, url) once it listens."""
    cmd = [sys.executable, "-m", "fedlearn.cli.main", "server", "--host", "127.0.0.1",
           "--port", "0", "--dataset", "digits", "--model", "mlp", "--rounds", str(rounds),
           "--min-clients", str(n), "--round-timeout", "300", "--seed", "0",
           "--out", str(run)]
    if mode != "plain":
        cmd += ["--secagg", "--secagg-timeout", str(stage_timeout)]
    if mode == "secagg-k10":
        cmd += ["--secagg-neighbours", str(SPARSE_NEIGHBOURS)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            if (run / "join-token").exists():
                return proc, str(json.loads((run / "server.json").read_text())["url"])
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not listen within {START_TIMEOUT:.0f} s; see {log}")


# -- the clients (a worker process runs some of them as threads) -----------------------
class CountingTransport(httpx.HTTPTransport):
    """An HTTP transport that adds up request and response body bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.up = 0
        self.down = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.up += len(request.read())
        response = super().handle_request(request)
        self.down += len(response.read())
        return response


def drops(index: int, round_number: int) -> bool:
    """Whether client ``index`` drops after its masked upload in ``round_number``:
    group A (index % 10 == 0) in odd rounds, group B (index % 10 == 5) in even ones."""
    return index % 10 == (0 if round_number % 2 else 5)


def worker(url: str, token: str, n: int, first: int, last: int, drop: bool,
           home: Path) -> dict[str, Any]:
    """Clients ``first`` .. ``last - 1`` as threads; their byte counts once the run is done."""
    import torch

    from fedlearn.client.remote import RemoteServer
    from fedlearn.client.worker import WorkerConfig, run_worker
    from fedlearn.errors import ConflictError

    torch.set_num_threads(1)

    class Remote(RemoteServer):
        index = 0

        def secagg_fetch(self, name: str, task_id: str, wait: float) -> dict[str, Any] | None:
            round_number = int(task_id[1:].split(".", 1)[0])
            if drop and name == "unmask" and drops(self.index, round_number):
                raise ConflictError("benchmark: this client drops after its masked upload.")
            return super().secagg_fetch(name, task_id, wait)

    counts: dict[str, Any] = {}
    errors: list[str] = []

    def one(i: int) -> None:
        transport = CountingTransport()
        config = WorkerConfig(server=url, client_id=f"c{i}", token=token, dataset="digits",
                              partition=f"iid:{n}:{i}", credential_file=str(home / f"c{i}.json"),
                              max_wait=1.0, poll_wait=30.0)
        try:
            with Remote(url, token, transport=transport) as remote:
                remote.index = i
                summary = run_worker(config, remote, log=lambda line: None)
            counts[f"c{i}"] = {"up": transport.up, "down": transport.down,
                               "accepted": summary.rounds_trained,
                               "refused": summary.updates_refused}
        except Exception as exc:  # reported by the parent as a FAILED line
            errors.append(f"c{i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(first, last)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": counts, "errors": errors}


def run_workers(url: str, token: str, n: int, procs: int, drop: bool, tmp: Path,
                server: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Start ``procs`` worker processes for the N clients; their merged counts."""
    cuts = [round(k * n / procs) for k in range(procs + 1)]
    started = []
    for k in range(procs):
        out = tmp / f"worker-{k}.json"
        cmd = [sys.executable, str(HERE), "--worker", url, "--token", token, "--n", str(n),
               "--first", str(cuts[k]), "--last", str(cuts[k + 1]), "--home", str(tmp),
               "--out", str(out), *(["--drop"] if drop else [])]
        log = open(tmp / f"worker-{k}.log", "wb")  # noqa: SIM115 - closed below
        started.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log))
    merged: dict[str, Any] = {"clients": {}, "errors": []}
    for proc, out, log in started:
        proc.wait(timeout=1800)
        log.close()
        if not out.exists():
            merged["errors"].append(f"worker exited {proc.returncode} without results; see "
                                    f"{log.name}")
            continue
        part = json.loads(out.read_text())
        merged["clients"].update(part["clients"])
        merged["errors"] += part["errors"]
    return merged


# -- one (N, mode) ------------------------------------------------------------------
def run_one(n: int, mode: str, rounds: int, stage_timeout: float, procs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="w8-") as tmp_name:
        tmp = Path(tmp_name)
        run = tmp / "run"
        started = time.perf_counter()
        server, url = start_server(run, n, rounds, mode, stage_timeout, tmp / "server.log")
        cpu0 = psutil.Process(server.pid).cpu_times()
        token = (run / "join-token").read_text().strip()
        cpu_box: list[float] = []

        def sample_cpu() -> None:  # the server's CPU seconds, until it exits
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(server.pid)
                while server.poll() is None:
                    t = proc.cpu_times()
                    cpu_box[:] = [t.user + t.system - cpu0.user - cpu0.system]
                    time.sleep(0.2)

        sampler = threading.Thread(target=sample_cpu, daemon=True)
        sampler.start()
        result = run_workers(url, token, n, procs, mode == "secagg-drop", tmp, server)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            result["errors"].append("the server did not exit after the run")
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        server_log = (tmp / "server.log").read_text(errors="replace")
    later = rows[1:] or rows
    up = sum(c["up"] for c in result["clients"].values())
    down = sum(c["down"] for c in result["clients"].values())
    out = {
        "n": n, "mode": mode, "rounds": len(rows), "wall_seconds": round(wall, 2),
        "round_seconds": round(statistics.median(r["seconds"] for r in later), 3),
        "secagg_seconds": _median(later, "secagg_seconds"),
        "unmask_seconds": _median(later, "secagg_unmask_seconds"),
        "server_cpu_per_round": round(cpu_box[0] / max(1, len(rows)), 3) if cpu_box else None,
        "bytes_per_round": round((up + down) / max(1, len(rows))),
        "up_per_client_round": round(up / n / max(1, len(rows))),
        "down_per_client_round": round(down / n / max(1, len(rows))),
        "sampled": [r["sampled"] for r in rows], "clients": [r["clients"] for r in rows],
        "recovered": [r.get("secagg_recovered", 0) for r in rows],
        "accuracy": rows[-1].get("accuracy") if rows else None,
        "failures": server_log.count("failed:"), "errors": result["errors"],
    }
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def merged_with_earlier(results: list[dict[str, Any]], rounds: int, stage_timeout: float,
                        procs: int) -> list[dict[str, Any]]:
    """These results and those of an earlier run with the same settings (other N or
    modes), so the sizes can be measured one invocation at a time."""
    from common import RESULTS

    path = RESULTS / "w8_secagg.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        earlier = json.loads(path.read_text())
        if (earlier["rounds"], earlier["secagg_timeout"], earlier["procs"]) == (
                rounds, stage_timeout, procs):
            done = {(r["n"], r["mode"]) for r in results}
            results = [r for r in earlier["results"] if (r["n"], r["mode"]) not in done] + results
    return sorted(results, key=lambda r: (r["n"], MODES.index(r["mode"])))


def kb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024:,.0f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,50,100")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--secagg-timeout", type=float, default=5.0)
    parser.add_argument("--procs", type=int, default=2, help="client worker processes")
    parser.add_argument("--modes", default=",".join(MODES[:3]))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--last", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--drop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        part = worker(args.worker, args.token, args.n, args.first, args.last, args.drop,
                      Path(args.home))
        Path(args.out).write_text(json.dumps(part))
        return
    sizes = [6] if args.quick else [int(s) for s in args.sizes.split(",")]
    rounds = 2 if args.quick else args.rounds
    modes = [m for m in args.modes.split(",") if m]
    results = []
    failed = False
    for n in sizes:
        for mode in modes:
            r = run_one(n, mode, rounds, args.secagg_timeout, args.procs)
            results.append(r)
            print(f"N={n} {mode}: {r['round_seconds']} s/round, {kb(r['bytes_per_round'])} "
                  f"per round, clients {r['clients']}, recovered {r['recovered']}", flush=True)
            if r["errors"] or r["failures"] or r["rounds"] != rounds:
                failed = True
                print(f"FAILED N={n} {mode}: {r['errors'][:3]} failures={r['failures']} "
                      f"rounds={r['rounds']}", flush=True)
    results = merged_with_earlier(results, rounds, args.secagg_timeout, args.procs)
    rows = [[r["n"], r["mode"], r["round_seconds"], r["secagg_seconds"] or "-",
             r["unmask_seconds"] or "-", r["server_cpu_per_round"],
             kb(r["bytes_per_round"]), kb(r["up_per_client_round"]),
             kb(r["down_per_client_round"]), "/".join(map(str, r["clients"])),
             "/".join(map(str, r["recovered"]))] for r in results]
    print(table(["N", "mode", "s/round", "secagg s", "unmask s", "server CPU s/round",
                 "bytes/round", "up/client", "down/client", "clients per round",
                 "recovered per round"], rows))
    path = write_json("w8_secagg", {"rounds": rounds, "secagg_timeout": args.secagg_timeout,
                                    "procs": args.procs, "results": results})
    print(f"wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
