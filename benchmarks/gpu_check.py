"""Driver pieces of ``benchmarks/gpu_check.sh`` and the figures writer shared by the benchmarks.

Subcommands (the shell script calls them; each is usable alone):

- ``exec --record FILE --name NAME -- CMD...``: run CMD in its own process group, record its exit status, wall time
  and peak host RAM (``ru_maxrss`` of the waited child, its reaped children included; this driver imports no torch, so
  the few MB it passes on at fork are negligible) to FILE; on SIGTERM (the shell's ``timeout``) the whole group is
  stopped and the step recorded as ``timeout``.
- ``env --json FILE``: the machine (torch, CUDA device, faiss GPUs, host RAM).
- ``voc-row --out DIR --device D --mode dry|quick|full``: a VOC-sized table row on the synthetic benchmark with a
  random ViT-S/14: ``dinokit synth --size 448`` then ``dinokit eval overcluster|linear|hummingbird``, each command
  timed with its peak host RAM. ``full`` is VOC's size (10,582 train / 1,449 val images, protocol defaults); ``quick``
  128 / 32 with one k-means seed; ``dry`` 8 / 4 at minimum settings.
- ``collect --dir DIR``: merge every step record, benchmark figures file and pytest report under DIR into
  ``DIR/gpu_check.json`` and print a summary.

Benchmarks call :func:`write_figures` for their ``--json PATH`` option.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

MB = 1024.0  # ru_maxrss is in kB on Linux


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _write_json(path: Path, obj: dict) -> None:
    from dinokit.io import atomic_write_text

    atomic_write_text(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


def write_figures(path: str | Path, name: str, args: argparse.Namespace | dict, figures: dict) -> None:
    """Write a benchmark's printed figures as JSON: {"benchmark", "figures", "meta"} with the run's config (its
    arguments), protocol ``benchmarks/<name>`` and versions (``dinokit.io.run_metadata``). Atomic; non-finite
    numbers are an error."""
    from dinokit.io import run_metadata

    config = _jsonable(vars(args) if isinstance(args, argparse.Namespace) else dict(args))
    config.pop("json", None)
    _write_json(Path(path), {"benchmark": name, "figures": figures,
                             "meta": run_metadata(config, protocol=f"benchmarks/{name}")})


# ------------------------------------------------------------------------------------------------ exec
def run_measured(cmd: list[str], timeout: float | None = None, log=None) -> dict:
    """Run ``cmd`` in a new process group; returns {cmd, rc, status, wall_s, peak_rss_mb}. ``timeout`` (s) stops the
    group (SIGTERM, then SIGKILL after 5 s); SIGTERM to this process does the same."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT if log else None)
    state: dict = {"timeout": False, "done": None}

    def reap() -> bool:  # non-blocking wait4 (never Popen.poll: it would reap the child and lose its rusage)
        if state["done"] is None:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                state["done"] = (status, ru)
        return state["done"] is not None

    def stop(*_):
        state["timeout"] = True
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if reap():
                    return
                time.sleep(0.1)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        while not reap():
            if timeout is not None and time.perf_counter() - t0 > timeout and not state["timeout"]:
                stop()
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, old)
    status, ru = state["done"]
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    status_s = "timeout" if state["timeout"] else ("ok" if rc == 0 else "failed")
    return {"cmd": cmd, "rc": rc, "status": status_s, "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(ru.ru_maxrss / MB, 1)}


def cmd_exec(a: argparse.Namespace) -> int:
    if a.skip:
        rec = {"cmd": a.cmd, "rc": None, "status": "skipped", "reason": a.skip, "wall_s": 0.0}
    else:
        rec = run_measured(a.cmd, timeout=a.limit)
    rec.update(name=a.name, limit_s=a.limit)
    _write_json(Path(a.record), rec)
    return 0 if rec["status"] in ("ok", "skipped") else (124 if rec["status"] == "timeout" else rec["rc"] or 1)


# ------------------------------------------------------------------------------------------------ env
def cmd_env(a: argparse.Namespace) -> int:
    import torch

    info: dict = {"python": platform.python_version(), "host": platform.node(), "torch": torch.__version__,
                  "cuda_available": torch.cuda.is_available(), "torch_threads": torch.get_num_threads(),
                  "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        info["host_ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(cuda=torch.version.cuda, device_name=p.name, device_memory_gb=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    try:
        import faiss

        info["faiss"] = getattr(faiss, "__version__", "?")
        info["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        info["faiss"] = None
    print(json.dumps(info, indent=1))
    write_figures(a.json, "env", {}, info)
    return 0


# ------------------------------------------------------------------------------------------------ VOC row
ROW_SIZES = {"dry": (8, 4), "quick": (128, 32), "full": (10_582, 1_449)}


def _row_commands(data: Path, out: Path, device: str, mode: str) -> list[tuple[str, list[str]]]:
    common = ["--data", str(data), "--backbone", "dinov2_vits14", "--weights", "random", "--device", device]
    if mode == "dry":
        over = ["--size", "448", "--ks", "[7,20]", "--seeds", "[0]", "--niter", "5", "--nredo", "1", "--batch_size",
                "4", "--n_figures", "1"]
        lin = ["--size", "448", "--epochs", "2"]
        hb = ["--size", "448", "--epochs", "1", "--memory_size", "2048", "--batch_size", "4", "--n_figures", "1"]
    elif mode == "quick":
        over = ["--seeds", "[0]", "--nredo", "1"]
        lin = ["--epochs", "5"]
        hb = []
    else:  # the protocols' defaults
        over, lin, hb = [], [], []
    return [("overcluster", ["eval", "overcluster", *common, "--out", str(out / "overcluster"), *over]),
            ("linear", ["eval", "linear", *common, "--out", str(out / "linear"), *lin]),
            ("hummingbird", ["eval", "hummingbird", *common, "--out", str(out / "hummingbird"), *hb])]


def cmd_voc_row(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(a.out)
    n_train, n_val = (a.n_train, a.n_val) if a.n_train else ROW_SIZES[a.mode]
    dk = [sys.executable, "-m", "dinokit.cli"]
    data = out / "synthetic"
    steps = [("synth", ["synth", "--out", str(data), "--size", "448", "--n_train", str(n_train), "--n_val",
                        str(n_val), "--layouts", "voc", "--overwrite", "true"])]
    steps += _row_commands(data / "voc", out, a.device, a.mode)
    records: dict = {}
    row: dict = {}
    ok = True
    with open(out / "voc_row.log", "w") as log:
        for name, argv in steps:
            left = a.budget - (time.perf_counter() - t0) - 5
            if not ok or left < 10:
                records[name] = {"status": "skipped", "reason": "an earlier command failed" if not ok else "budget"}
                ok = False
                continue
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            rec = run_measured(dk + argv, timeout=left, log=log)
            print(f"voc-row {name:12s} {rec['status']:8s} {rec['wall_s']:8.1f} s  peak RSS "
                  f"{rec['peak_rss_mb']:8.0f} MB", flush=True)
            res = out / name / f"{name}.json"
            if rec["status"] == "ok" and res.is_file():
                metrics = {k: v for k, v in json.loads(res.read_text()).items() if not k.startswith("meta")}
                rec["miou"] = {k: v for k, v in metrics.items()  # the means over seeds, not each seed's value
                               if k.endswith("/miou") and not any(re.fullmatch(r"s\d+", p) for p in k.split("/"))}
                row.update({f"{name}/{k}": v for k, v in rec["miou"].items()})
            records[name] = rec
            ok = ok and rec["status"] == "ok"
    figures = {"mode": a.mode, "n_train": n_train, "n_val": n_val, "device": a.device, "backbone": "dinov2_vits14",
               "weights": "random", "commands": records, "row": row,
               "peak_rss_mb": max((r.get("peak_rss_mb", 0.0) for r in records.values()), default=0.0),
               "wall_s": round(time.perf_counter() - t0, 1)}
    write_figures(a.json, "voc_row", {"mode": a.mode, "device": a.device, "budget_s": a.budget}, figures)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------ collect
def _junit(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 2)
    bad = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            for el in case.iter(tag):
                bad.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                            "message": (el.get("message") or "")[:500]})
    out["problems"] = bad
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def cmd_collect(a: argparse.Namespace) -> int:
    from dinokit.io import run_metadata

    d = Path(a.dir)
    steps: dict = {}
    for rec_path in sorted((d / "steps").glob("*.json"), key=lambda p: p.stat().st_mtime):
        rec = json.loads(rec_path.read_text())
        fig = d / "figures" / f"{rec['name']}.json"
        if fig.is_file():
            data = json.loads(fig.read_text())
            rec["figures"] = data.get("figures")
            rec["config"] = data.get("meta", {}).get("config")
        steps[rec["name"]] = rec
    tests = {p.stem: _junit(p) for p in sorted(d.glob("pytest_*.xml"))}
    env = steps.get("env", {}).get("figures", {})
    failed = [n for n, r in steps.items() if r["status"] not in ("ok", "skipped")]
    skipped = [n for n, r in steps.items() if r["status"] == "skipped"]
    options = json.loads(a.options) if a.options else {}
    result = {"ok": not failed, "failed_steps": failed, "skipped_steps": skipped, "total_wall_s": a.wall,
              "device": env, "tests": tests, "steps": steps,
              "meta": run_metadata(options, protocol="benchmarks/gpu_check")}
    _write_json(d / "gpu_check.json", result)
    print(f"\n{'step':28s} {'status':8s} {'wall s':>8s} {'peak RSS MB':>12s}")
    for n, r in steps.items():
        print(f"{n:28s} {r['status']:8s} {r.get('wall_s', 0):8.1f} {r.get('peak_rss_mb', 0):12.0f}")
    for name, t in tests.items():
        print(f"{name}: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for p in t["problems"]:
            print(f"  {p['kind']}: {p['test']}: {p['message'][:200]}")
    print(f"total {a.wall:.0f} s; {len(failed)} failed step(s) {failed or ''}; {len(skipped)} skipped {skipped or ''}")
    print(f"wrote {d / 'gpu_check.json'}")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("exec", help="run one step, recording status, wall time and peak RSS")
    e.add_argument("--record", required=True)
    e.add_argument("--name", required=True)
    e.add_argument("--limit", type=float, default=None, help="seconds before the step is stopped")
    e.add_argument("--skip", default=None, help="record the step as skipped with this reason")
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    v = sub.add_parser("env")
    v.add_argument("--json", required=True)
    r = sub.add_parser("voc-row")
    r.add_argument("--out", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--mode", choices=sorted(ROW_SIZES), default="quick")
    r.add_argument("--budget", type=float, default=3600.0, help="seconds for all commands together")
    r.add_argument("--n-train", type=int, default=None)
    r.add_argument("--n-val", type=int, default=None)
    c = sub.add_parser("collect")
    c.add_argument("--dir", required=True)
    c.add_argument("--wall", type=float, default=0.0)
    c.add_argument("--options", default=None, help="the script's options as a JSON object")
    a = ap.parse_args(argv)
    if a.what == "exec":
        a.cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
        if not a.cmd:
            ap.error("exec: give the command after --")
    if a.what == "voc-row":
        Path(a.out).mkdir(parents=True, exist_ok=True)
    return {"exec": cmd_exec, "env": cmd_env, "voc-row": cmd_voc_row, "collect": cmd_collect}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
