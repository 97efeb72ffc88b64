#!/usr/bin/env python3
"""Comparative benchmark: Lifeboat against restic and borg, side by side.

One run measures all three tools on the same machine and the same data:
init, a first backup of tree A, an unchanged re-backup of A, a backup of a
similar tree B into the same repository (cross-version dedup), a full restore
of A's first snapshot, a restore of A's largest file alone, and a full data
check. Every restore is verified against the source (sizes, SHA-256 of
contents, symlink targets); a mismatch is a failure.

Design:
* Each tool runs as a child process forked by a tiny launcher process and
  reaped with os.wait4, which yields its rusage: wall time (perf_counter
  around the child), user+sys CPU and peak RSS (ru_maxrss, KiB). The launcher
  exists because a child's ru_maxrss starts at its forking parent's RSS
  high-water mark. An interval timer kills the child's process group when
  the per-step timeout expires, so nothing runs unbounded. Tool output goes
  to log files under the scratch directory. After each step os.sync() writes
  back its dirty pages (untimed), and the machine's busy CPU time from
  /proc/stat minus the tool's own shows whether anything else interfered.
* Fairness: all tools encrypt, compress (zstd level 3 or restic's `auto`),
  keep their caches in the scratch directory (deleted at the start), and
  read from a warm page cache (every file of A and B is read once first).
* ext4 is slow at creating many files right after many were deleted nearby,
  so old scratch content is deleted (and synced) at the start, the first
  timed step waits until --settle seconds have passed since that or since
  the previous run deleted its trees at its end (a stamp file beside the
  scratch directory says when), every restore goes to a brand-new
  directory, and restored trees are deleted only at the end. Other
  deletions on the same file system (a test suite that just ran) still
  slow every tool's restores; run the benchmark on a quiet machine.
* Repository size is the apparent size (sum of st_size) of the repository
  directory; st_blocks*512 is also kept in the JSON output.
This is a measurement, not a test: nothing asserts durations.
"""
import argparse, hashlib, json, os, platform, random, shutil, subprocess, sys, time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "bench-passphrase-not-secret"
TOOLS = ("lifeboat", "restic", "borg")
STEPS = ("init", "backup A (first)", "backup A (unchanged)", "backup B (similar tree)",
         "restore A (full)", "restore largest file", "check --read-data")
BACKUP_STEPS = STEPS[1:4]
MiB = 1 << 20


def log(msg):
    """Progress goes to stderr so stdout holds only the Markdown report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# The children are started by this small launcher (python3 -S), not by the main
# process: on Linux an exec'd child's ru_maxrss starts at the RSS high-water mark
# of the process that forked it, and the main process grows with the manifests.
LAUNCHER = r"""
import json, os, signal, sys, time
state = {"pid": 0, "timed_out": False}
def on_alarm(*_):
    if state["pid"]:
        state["timed_out"] = True
        try:
            os.killpg(state["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGALRM, on_alarm)
for line in sys.stdin:
    req = json.loads(line)
    state["timed_out"] = False
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            if req["cwd"]:
                os.chdir(req["cwd"])
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.execvpe(req["argv"][0], req["argv"], req["env"])
        except BaseException as e:
            os.write(2, repr(e).encode())
        os._exit(127)
    state["pid"] = pid
    signal.setitimer(signal.ITIMER_REAL, req["timeout"])
    _, status, ru = os.wait4(pid, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    state["pid"] = 0
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": time.perf_counter() - start,
                      "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024,
                      "timed_out": state["timed_out"]}), flush=True)
"""


class Launcher:
    """Runs measured children through the LAUNCHER process, one request at a time."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv, env, cwd, logfile, timeout):
        """Run one child; return dict(rc, wall, cpu, rss_mib, timed_out) from its os.wait4 rusage."""
        req = {"argv": argv, "env": env, "cwd": str(cwd) if cwd else None, "log": str(logfile), "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("launcher process died")
        return json.loads(line)

    def close(self):
        """Let the launcher exit (end of its input) and reap it."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


def run_quiet(argv, env=None, cwd=None, timeout=600):
    """Run a helper command (not measured); return stdout, raise on failure."""
    res = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res.stdout


def scan(root):
    """Yield (relpath, DirEntry) for every entry under root, not following symlinks."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for e in it:
                r = os.path.join(rel, e.name)
                yield r, e
                if e.is_dir(follow_symlinks=False):
                    stack.append(r)


def file_digest(path, buf=bytearray(MiB)):
    """SHA-256 of a file, read in 1 MiB blocks into one reused buffer."""
    h, view = hashlib.sha256(), memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def manifest(root):
    """Map relpath -> ('d',) | ('l', target) | ('f', size, sha256) | ('o',) for a tree."""
    m = {}
    for rel, e in scan(root):
        if e.is_symlink():
            m[rel] = ("l", os.readlink(e.path))
        elif e.is_dir(follow_symlinks=False):
            m[rel] = ("d",)
        elif e.is_file(follow_symlinks=False):
            size = e.stat(follow_symlinks=False).st_size
            m[rel] = ("f", size, file_digest(e.path))
        else:
            m[rel] = ("o",)
    return m


def compare(expected, restored_root, only=None):
    """Compare a restored tree with the source manifest; return a list of problems (max 10 shown)."""
    if not os.path.isdir(restored_root):
        return [f"restored root {restored_root} missing"]
    got = manifest(restored_root)
    want = {only: expected[only]} if only else expected
    problems = [f"missing {p}" for p in sorted(want.keys() - got.keys())]
    problems += [f"extra {p}" for p in sorted(got.keys() - want.keys())
                 if not (only and got[p] == ("d",) and only.startswith(p + "/"))]
    for p in sorted(want.keys() & got.keys()):
        w, g = want[p], got[p]
        if w != g:
            what = ("contents differ" if w[:2] == g[:2] else f"size {w[1]} != {g[1]}") if w[0] == g[0] == "f" \
                else f"want {w[:2]}, got {g[:2]}"
            problems.append(f"differs {p}: {what}")
    return problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])


def dir_size(path):
    """Return (apparent bytes = sum st_size, allocated bytes = sum st_blocks*512) of a tree."""
    app = alloc = 0
    for root, dirs, files in os.walk(path):
        for n in files + dirs:
            st = os.lstat(os.path.join(root, n))
            app, alloc = app + st.st_size, alloc + st.st_blocks * 512
    return app, alloc


def generate(out, size_mb, seed):
    """Deterministically create trees A and B (B = A with ~10% files modified, some added)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]

    def text(n):
        return " ".join(rng.choices(words, k=n // 6 + 1)).encode()[:n]
    a, total = out / "A", size_mb * MiB
    budget = {"large": total // 4, "text": total * 3 // 10, "random": total * 3 // 10}
    budget["small"] = total - sum(budget.values())
    files, i = [], 0
    for kind in ("text", "random", "small"):
        left = budget[kind]
        while left > 0:
            n = min(left, rng.randint(1024, 16384) if kind == "small" else rng.randint(64 << 10, 8 << 20))
            files.append((f"{kind}/d{i % 37:02d}/s{i % 11}/{kind}{i:06d}.bin", kind, n))
            left, i = left - n, i + 1
    files.append(("large/big.img", "large", budget["large"]))
    for rel, kind, n in files:
        p = a / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "large":  # half random, half text, written in pieces to bound memory
            with open(p, "wb") as f:
                for off in range(0, n, 8 * MiB):
                    k = min(8 * MiB, n - off)
                    f.write(rng.randbytes(k) if (off // (8 * MiB)) % 2 else text(k))
        else:
            p.write_bytes(rng.randbytes(n) if kind == "random" else text(n))
    for j in range(20):
        os.symlink(f"../../{files[j][0]}", a / "text" / f"link{j:02d}")
    shutil.copytree(a, out / "B", symlinks=True)
    for rel, kind, n in rng.sample(files, max(1, len(files) // 10)):
        with open(out / "B" / rel, "r+b") as f:  # overwrite a slice somewhere in the file
            f.seek(rng.randrange(max(1, n - 4096)))
            f.write(rng.randbytes(4096))
    for j in range(max(1, len(files) // 20)):
        p = out / "B" / "added" / f"new{j:05d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text(rng.randint(1024, 256 << 10)))
    (out / ".complete").touch()


class Garage:
    """A single-node Garage S3 server on loopback for --s3 runs (fsync off for both tools alike).

    Started with a generated config; layout, key and bucket are set up with its CLI. Server CPU
    is not part of any tool's CPU time: it shows as CPU outside the tool in the report."""
    BUCKET, REGION = "bench", "garage"

    def __init__(self, base):
        self.base = base
        base.mkdir(parents=True)
        ports = []
        for _ in range(2):
            import socket
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        self.rpc_port, self.s3_port = ports
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.key_id = "GK" + os.urandom(12).hex()
        self.secret = os.urandom(32).hex()
        self.config = base / "garage.toml"
        self.config.write_text(
            f'metadata_dir = "{base / "meta"}"\ndata_dir = "{base / "data"}"\ndb_engine = "sqlite"\n'
            'metadata_fsync = false\ndata_fsync = false\ndisable_scrub = true\ncompression_level = "none"\n'
            f'replication_factor = 1\nrpc_bind_addr = "127.0.0.1:{self.rpc_port}"\n'
            f'rpc_public_addr = "127.0.0.1:{self.rpc_port}"\nrpc_secret = "{os.urandom(32).hex()}"\n\n'
            f'[s3_api]\napi_bind_addr = "127.0.0.1:{self.s3_port}"\ns3_region = "{self.REGION}"\n'
            'root_domain = ".s3.garage.localhost"\n')
        exe = shutil.which("garage") or str(Path.home() / ".cargo" / "bin" / "garage")
        if not Path(exe).exists():
            sys.exit("--s3 needs garage: run `cargo install garage --locked`")
        self.cli = [exe, "-c", str(self.config)]
        self.log = open(base / "garage.log", "w")
        self.proc = subprocess.Popen([*self.cli, "server"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, RUST_LOG="warn", NO_COLOR="1"))
        deadline = time.monotonic() + 60
        while True:
            try:
                run_quiet([*self.cli, "status"], timeout=30)  # the RPC port answers
                node = run_quiet([*self.cli, "node", "id", "-q"], timeout=30).strip().split("@")[0]
                break
            except RuntimeError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    sys.exit(f"garage did not start; see {base / 'garage.log'}")
                time.sleep(0.2)
        run_quiet([*self.cli, "layout", "assign", "-z", "dc1", "-c", "10G", node])
        run_quiet([*self.cli, "layout", "apply", "--version", "1"])
        for attempt in range(100):
            try:
                run_quiet([*self.cli, "key", "import", "--yes", "-n", "bench", self.key_id, self.secret])
                break
            except RuntimeError as e:
                if attempt == 99:
                    raise
                if "already" in str(e).lower():
                    break
                time.sleep(0.2)
        run_quiet([*self.cli, "bucket", "create", self.BUCKET])
        run_quiet([*self.cli, "bucket", "allow", "--read", "--write", "--owner", self.BUCKET, "--key", self.key_id])

    def env(self):
        """AWS-style credentials every S3 client reads, kept away from the user's own AWS config."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": self.REGION, "AWS_DEFAULT_REGION": self.REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def prefix_size(self, prefix):
        """Sum of object sizes under prefix (boto3, which moto brings); (bytes, bytes) like dir_size."""
        try:
            import boto3
        except ImportError:
            return 0, 0
        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.REGION,
                          aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)
        total = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET, Prefix=prefix + "/"):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total, total

    def stop(self):
        """Stop the server."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Tool:
    """Command lines and environment for one backup program (the same seven steps each)."""

    def __init__(self, name, scratch, lifeboat_bin, garage=None):
        self.name, self.base = name, scratch / name
        self.repo = self.base / "repo"
        self.garage = garage
        self.exe = str(lifeboat_bin) if name == "lifeboat" else name
        cache = self.base / "cache"
        env = dict(os.environ, XDG_CACHE_HOME=str(cache), XDG_CONFIG_HOME=str(self.base / "config"))
        env.update({
            "lifeboat": {"LIFEBOAT_PASSPHRASE": PASSPHRASE, "LIFEBOAT_REPOSITORY": str(self.repo),
                         "LIFEBOAT_CACHE_DIR": str(cache)},
            "restic": {"RESTIC_PASSWORD": PASSPHRASE, "RESTIC_REPOSITORY": str(self.repo),
                       "RESTIC_CACHE_DIR": str(cache)},
            "borg": {"BORG_PASSPHRASE": PASSPHRASE, "BORG_REPO": str(self.repo),
                     "BORG_BASE_DIR": str(self.base), "BORG_CACHE_DIR": str(cache),
                     "BORG_CONFIG_DIR": str(self.base / "config"),
                     "BORG_SECURITY_DIR": str(self.base / "security"), "BORG_KEYS_DIR": str(self.base / "keys"),
                     "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                     "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"},
        }[name])
        env.pop("LIFEBOAT_PASSPHRASE_FILE", None)
        if garage:
            env.update(garage.env())
            env["LIFEBOAT_REPOSITORY"] = f"s3://{garage.BUCKET}/lifeboat"
            env["LIFEBOAT_S3_ENDPOINT"] = garage.endpoint
            env["RESTIC_REPOSITORY"] = f"s3:{garage.endpoint}/{garage.BUCKET}/restic"
        self.env = env

    def repo_size(self):
        """(apparent, allocated) bytes of the repository: its directory, or its objects in the bucket."""
        return self.garage.prefix_size(self.name) if self.garage else dir_size(self.repo)

    def version(self):
        """The tool's own version string."""
        arg = {"lifeboat": ["--version"], "restic": ["version"], "borg": ["--version"]}[self.name]
        return run_quiet([self.exe, *arg], env=self.env).strip().splitlines()[0]

    def command(self, step, a, b, target, single):
        """argv and cwd for one step; restores land in target + absolute source path for all tools."""
        x, n = self.exe, self.name
        if step == "init":
            return {"lifeboat": [x, "init"], "restic": [x, "init", "--repository-version", "2"],
                    "borg": [x, "init", "--encryption=repokey-blake2"]}[n], None
        if step in BACKUP_STEPS:
            src, label = (b, "B1") if step == BACKUP_STEPS[2] else (a, "A1" if step == BACKUP_STEPS[0] else "A2")
            return {"lifeboat": [x, "backup", str(src)],
                    "restic": [x, "backup", "--compression", "auto", str(src)],
                    "borg": [x, "create", "--compression", "zstd,3", f"::{label}", str(src)]}[n], None
        if step.startswith("restore"):
            snap, file = self.first_snapshot(a), (a / single if step == STEPS[5] else None)
            if n == "borg":
                return [x, "extract", "::A1"] + ([str(file).lstrip("/")] if file else []), target
            return [x, "restore", snap, "--target", str(target)] + (["--include", str(file)] if file else []), None
        return {"lifeboat": [x, "check", "--read-data"], "restic": [x, "check", "--read-data"],
                "borg": [x, "check", "--verify-data"]}[n], None

    def first_snapshot(self, a):
        """ID of the earliest snapshot whose paths include A (borg: the archive name A1)."""
        if self.name == "borg":
            return "A1"
        snaps = json.loads(run_quiet([self.exe, "snapshots", "--json"], env=self.env))
        snaps = [s for s in snaps if str(a) in s.get("paths", [])]
        return min(snaps, key=lambda s: s["time"])["id"]


def ensure_tools(args):
    """Build lifeboat (unless --no-build) and apt-get install restic/borg if missing."""
    if not args.no_build:
        log("cargo build --release -p lifeboat-cli")
        subprocess.run(["cargo", "build", "--release", "-p", "lifeboat-cli"], cwd=REPO_ROOT, check=True, timeout=3600)
    if not shutil.which("restic") or not shutil.which("borg"):
        inst = ["apt-get", "install", "-y", "restic", "borgbackup"]
        log("installing restic and borgbackup with apt-get")
        if subprocess.run(inst, timeout=1200).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True, timeout=1200)
            subprocess.run(inst, check=True, timeout=1200)


def machine():
    """nproc, CPU model, memory and kernel, for the report header."""
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), 0)
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_mib": mem, "kernel": platform.release()}


def system_busy_s():
    """CPU seconds the whole machine has spent busy since boot (first line of /proc/stat)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(f[i]) for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


def disturbed(r):
    """Whether the machine spent notable CPU outside the tool during a step (beyond writeback noise)."""
    return r["other_cpu"] > 0.25 * r["wall"] + 0.5


def fmt(v, digits=1):
    """A number for the table, or '—' when absent."""
    return "—" if v is None else f"{v:.{digits}f}"


def report(meta, results):
    """Markdown report: header lines, then one row per step with per-tool numbers and ratios."""
    out = ["# " + " vs ".join(results), ""]
    m = meta["machine"]
    out.append(f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_mib']} MiB RAM, Linux {m['kernel']}")
    other = [(r["other_cpu"], t, s) for t in results for s, r in results[t].items()]
    worst = max(other, default=(0, "-", "-"))
    out.append(f"- CPU used outside the measured processes during the steps (kernel writeback, other load): "
               f"{sum(o[0] for o in other):.1f} s in total, at most {worst[0]:.1f} s ({worst[1]}: {worst[2]})")
    out.append("- Versions: " + "; ".join(f"{t}: {v}" for t, v in meta["versions"].items()))
    for k, d in meta["data"].items():
        out.append(f"- Tree {k}: `{d['path']}`, {d['bytes'] / MiB:.0f} MiB in {d['files']} files "
                   f"({d['dirs']} dirs, {d['symlinks']} symlinks)")
    out.append(f"- Page cache warmed: read every file of A and B once ({meta['warm_s']:.1f} s) before the first step")
    out.append(f"- Peak RSS from os.wait4 ru_maxrss; a no-op child measures {meta['rss_floor_mib']:.0f} MiB (the floor)")
    out.append(f"- Repositories in: {meta.get('store', 'local directories')}")
    out += ["- Repo size = apparent bytes (sum of st_size) of the repository directory (or of its S3 objects) "
            "after the step", ""]
    tools = list(results)
    head = ["step"] + [f"{t} {c}" for t in tools for c in ("wall s", "CPU s", "RSS MiB", "repo MiB")]
    head += ["lifeboat ÷ best peer: wall", "÷ best: RSS", "÷ best: size"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in STEPS:
        row, per = [step], {}
        for t in tools:
            r = results[t].get(step)
            if r is None or not r["ok"]:
                bad = "skipped" if r is None else "timeout" if r["timed_out"] else \
                    "MISMATCH" if r.get("verified") is False else "FAIL"
                row += [bad] + ["—"] * 3
                continue
            per[t] = r
            row += [fmt(r["wall"]) + ("*" if disturbed(r) else ""), fmt(r["cpu"]), fmt(r["rss_mib"], 0),
                    fmt(r["repo_bytes"] / MiB, 0) if "repo_bytes" in r else "—"]
        for key in ("wall", "rss_mib", "repo_bytes"):
            peers = [per[p][key] for p in ("restic", "borg") if p in per and key in per[p]]
            lb = per.get("lifeboat", {}).get(key)
            row.append(f"{lb / min(peers):.2f}" if lb is not None and peers and min(peers) > 0 else "—")
        out.append("| " + " | ".join(row) + " |")
    if any(disturbed(r) for t in results for r in results[t].values()):
        out += ["", "\\* the machine spent notable CPU outside the tool during this step (other load?); "
                "its times are suspect"]
    return "\n".join(out)


def main():
    """Parse options, prepare data and scratch, run every tool's steps, report, and set the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tc = Path.home() / ".rustup" / "toolchains"
    ap.add_argument("--data", type=Path, help="tree A (default: the stable Rust toolchain)")
    ap.add_argument("--data2", type=Path, help="tree B (default: the nightly toolchain)")
    ap.add_argument("--generated", type=int, metavar="SIZE_MB", help="generate A and B of this size instead")
    ap.add_argument("--seed", type=int, default=1, help="seed for --generated (default 1)")
    ap.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"),
                    help="work directory, emptied at the start (default /work/bench-scratch)")
    ap.add_argument("--timeout", type=float, default=1800, help="per-step timeout in seconds")
    ap.add_argument("--settle", type=float, default=60,
                    help="seconds between the last deletion of old scratch (at the start, or at the end "
                         "of the previous run) and the first step (ext4 without a journal scans inodes "
                         "deleted in the last 60 s, or 360 s while unwritten, on every file it creates)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--lifeboat", type=Path, default=REPO_ROOT / "target" / "release" / "lifeboat",
                    help="lifeboat binary (default target/release/lifeboat)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    ap.add_argument("--keep", action="store_true", help="keep repositories and restored trees")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write raw numbers as JSON")
    ap.add_argument("--s3", action="store_true",
                    help="repositories in a loopback Garage S3 server instead of directories (lifeboat and restic; "
                         "borg has no S3 support)")
    args = ap.parse_args()
    if args.s3 and args.tools == ",".join(TOOLS):
        args.tools = "lifeboat,restic"
    if args.s3 and "borg" in args.tools.split(","):
        ap.error("--s3: borg cannot write to S3; use --tools lifeboat,restic")
    if not set(args.tools.split(",")) <= set(TOOLS):
        ap.error(f"--tools: choose from {','.join(TOOLS)}")
    launcher = Launcher()  # started while this process is still small
    ensure_tools(args)
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    gen_name = f"data-{args.generated}mb-seed{args.seed}" if args.generated else None
    # The previous run deleted its trees when it ended; its stamp says when
    # (wall clock, since that was another process).
    stamp = scratch.parent / (scratch.name + ".deleted-at")
    try:
        ended_ago = max(0.0, time.time() - float(stamp.read_text()))
    except (OSError, ValueError):
        ended_ago = float("inf")
    deleted_any = False
    for p in scratch.iterdir():  # delete old content, keep a finished generated data set
        if p.name != gen_name or not (p / ".complete").exists():
            log(f"deleting old {p}")
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            deleted_any = True
    os.sync()  # clean inode tables: ext4 remembers a deletion longer while they are dirty
    # --settle counts from the last deletion: this run's, or the end of the previous one.
    deleted_at = time.monotonic() - (0.0 if deleted_any else ended_ago)
    if args.generated:
        if not (scratch / gen_name / ".complete").exists():
            log(f"generating {args.generated} MiB data set (seed {args.seed})")
            generate(scratch / gen_name, args.generated, args.seed)
        a, b = scratch / gen_name / "A", scratch / gen_name / "B"
    else:
        a = args.data or tc / "stable-x86_64-unknown-linux-gnu"
        b = args.data2 or (tc / "nightly-x86_64-unknown-linux-gnu" if not args.data else None)
        if b is None or not b.is_dir():
            sys.exit(f"need a second tree B: give --data2 DIR (or --generated SIZE_MB); {b} is not a directory")
    a, b = a.resolve(), b.resolve()
    log(f"warming page cache and hashing A ({a}); reading B ({b})")
    t0 = time.perf_counter()
    want_a, want_b = manifest(a), manifest(b)  # reading every file warms the page cache
    warm_s = time.perf_counter() - t0
    data = {}
    for k, path, m in (("A", a, want_a), ("B", b, want_b)):
        data[k] = {"path": str(path), "bytes": sum(v[1] for v in m.values() if v[0] == "f"),
                   "files": sum(v[0] == "f" for v in m.values()), "dirs": sum(v[0] == "d" for v in m.values()),
                   "symlinks": sum(v[0] == "l" for v in m.values())}
    del want_b
    largest = max((p for p, v in want_a.items() if v[0] == "f"), key=lambda p: want_a[p][1])
    garage = Garage(scratch / "garage") if args.s3 else None
    if garage:
        log(f"garage S3 server at {garage.endpoint}, bucket {garage.BUCKET}")
        meta_store = f"Garage S3 on loopback ({garage.endpoint})"
    else:
        meta_store = "local directories"
    tools = [Tool(n, scratch, args.lifeboat.resolve(), garage) for n in args.tools.split(",")]
    versions = {t.name: t.version() for t in tools}
    if "lifeboat" in versions:
        try:
            built = time.strftime("%Y-%m-%d %H:%M", time.localtime(args.lifeboat.stat().st_mtime))
            tree = run_quiet(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT).strip()
            versions["lifeboat"] += f" (binary built {built}; source tree at git {tree})"
        except (RuntimeError, OSError):
            pass
    floor = launcher.run(["true"], dict(os.environ), None, os.devnull, 60)["rss_mib"]
    meta = {"versions": versions, "data": data, "rss_floor_mib": floor, "store": meta_store,
            "warm_s": warm_s, "largest_file": largest, "timeout_s": args.timeout}
    wait = args.settle - (time.monotonic() - deleted_at)
    if wait > 0:
        log(f"sleeping {wait:.0f} s so ext4 forgets the deleted inodes")
        time.sleep(wait)
    meta["machine"] = machine()
    results, failures = {}, []
    for tool in tools:
        (tool.base / "logs").mkdir(parents=True)
        results[tool.name] = {}
        for i, step in enumerate(STEPS):
            target = tool.base / f"restore-{i}"
            if step.startswith("restore"):
                target.mkdir()
            try:
                argv, cwd = tool.command(step, a, b, target, largest)
            except (RuntimeError, ValueError, KeyError) as e:
                failures.append(f"{tool.name} / {step}: cannot prepare: {e}")
                break
            log(f"{tool.name}: {step}: {' '.join(argv)}")
            busy = system_busy_s()
            r = launcher.run(argv, tool.env, cwd, tool.base / "logs" / f"{i}.log", args.timeout)
            r["other_cpu"] = max(0.0, system_busy_s() - busy - r["cpu"])
            os.sync()  # write back this step's dirty pages before anything else is timed
            if disturbed(r):
                log(f"warning: {r['other_cpu']:.1f} s of CPU outside the tool during this step: is the machine idle?")
            r["ok"], r["argv"] = r["rc"] == 0 and not r["timed_out"], argv
            results[tool.name][step] = r
            if not r["ok"]:
                tail = (tool.base / "logs" / f"{i}.log").read_text(errors="replace")[-800:]
                why = "timed out" if r["timed_out"] else f"exit code {r['rc']}"
                failures.append(f"{tool.name} / {step}: {why}\n{tail}")
                log(f"{tool.name}: {step}: FAILED ({why}); skipping its remaining steps")
                break
            if step in BACKUP_STEPS:
                r["repo_bytes"], r["repo_alloc_bytes"] = tool.repo_size()
            if step.startswith("restore"):
                problems = compare(want_a, str(target) + str(a), largest if step == STEPS[5] else None)
                r["verified"] = not problems
                if problems:
                    r["ok"] = False
                    failures.append(f"{tool.name} / {step}: restore differs from source:\n  " + "\n  ".join(problems))
            log(f"{tool.name}: {step}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, {r['rss_mib']:.0f} MiB"
                + (" VERIFIED" if r.get("verified") else ""))
    launcher.close()
    if garage:
        garage.stop()
    print(report(meta, results))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if not args.keep:
        for tool in tools:
            shutil.rmtree(tool.base, ignore_errors=True)
        os.sync()
        stamp.write_text(f"{time.time()}\n")
    if failures:
        print("\nFAILURES:\n" + "\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
