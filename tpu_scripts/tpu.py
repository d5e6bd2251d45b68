#!/usr/bin/env python3
"""Cloud TPU launcher for qed-jax: create a TPU VM or pod slice through queued resources, copy
the code to every worker, run one command on all workers at once, and babysit a training job
through preemptions. Standard library only, so it runs on a laptop that has `gcloud`.

    python tpu_scripts/tpu.py launch my-slice --zone us-east5-a --accelerator-type v5p-64 --capacity spot \\
        -- qed-jax sft --config configs/sft/qed_nano_4b.yaml micro_batches=1 checkpoint_dir=gs://B/run --distributed

Every command takes --dry-run, which prints the gcloud commands instead of running them.
"""
import argparse
import contextlib
import difflib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REMOTE_HOME = "~/qed-jax"  # where the code lives on each worker (worker_setup.sh unpacks it there)

# Runtime (software) version per TPU generation, from cloud.google.com/tpu/docs/runtimes.
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}

# Hosts (TPU VMs, one JAX process each) in a slice. The number in an accelerator type counts
# TensorCores on v4/v5p (two per chip) and chips on v5e/v6e. Every multi-host slice has 4 chips
# per host; v5e/v6e slices of up to 8 chips are a single host.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}
SINGLE_HOST_MAX_CHIPS = {"v4": 4, "v5p": 4, "v5litepod": 8, "v6e": 8}  # as qed_jax/plan.py's GENERATIONS

# Queued-resource states (QueuedResourceState.State). ACCEPTED is the older name of
# WAITING_FOR_RESOURCES. PREEMPTED is a node state some tools report for the same event.
PENDING = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}
PREEMPTED = {"SUSPENDING", "SUSPENDED", "PREEMPTED"}

CAPACITY_FLAGS = {"spot": ["--spot"], "reserved": ["--reserved"], "on-demand": [],
                  "best-effort": ["--best-effort"]}


class LaunchError(Exception):
    """A failure to report in one line (what, where, what to do)."""


def parse_accelerator(accelerator: str) -> tuple[str, int]:
    match = re.fullmatch(r"(v4|v5litepod|v5p|v6e)-(\d+)", accelerator)
    if not match:
        raise LaunchError(f"unknown accelerator type {accelerator!r}: expected v4-N, v5litepod-N, "
                          "v5p-N or v6e-N as Cloud names them (e.g. v5p-64; a v5e slice is v5litepod-N)")
    generation, count = match.group(1), int(match.group(2))
    per_chip = CORES_PER_CHIP[generation]
    # v5e and v6e slices are 2-D grids that grow by doubling a side (as qed_jax/plan.py's chip_grid)
    if count < 1 or count % per_chip or (per_chip == 1 and count & (count - 1)):
        raise LaunchError(f"{accelerator}: no such slice; {generation}-N counts "
                          + (f"TensorCores, {per_chip} per chip, so N is a positive multiple of {per_chip}"
                             if per_chip > 1 else "chips, so N is a power of two (e.g. 8, 16 or 64)"))
    return generation, count


def runtime_version(accelerator: str) -> str:
    return RUNTIME_VERSIONS[parse_accelerator(accelerator)[0]]


def num_workers(accelerator: str) -> int:
    generation, count = parse_accelerator(accelerator)
    chips = count // CORES_PER_CHIP[generation]
    if chips <= SINGLE_HOST_MAX_CHIPS[generation]:
        return 1
    if chips % 4:
        raise LaunchError(f"{accelerator} has {chips} chips, not a multiple of 4 per host")
    return chips // 4


# gcloud's errors that a retry cannot cure (a missing permission, a bad zone or project): reported at
# once, those of gcloud's own setup with what sets it up.
PERMANENT_ERRORS = {
    "PERMISSION_DENIED": None, "INVALID_ARGUMENT": None,
    "You do not currently have an active account": "gcloud has no active account: run `gcloud auth login`",
    "Failed to find attribute [project]": "no project: pass --project, or set CLOUDSDK_CORE_PROJECT",
    "required property [project]": "no project: pass --project, or set CLOUDSDK_CORE_PROJECT",
}


def gcloud_error(stderr: str) -> str:
    """What a failed gcloud command says, in one line: the advice for a permanent error of its
    setup, else its first `ERROR:` line (its last lines are often advice that reads as nothing
    alone), else its last line."""
    for marker, advice in PERMANENT_ERRORS.items():
        if advice and marker in stderr:
            return advice
    lines = stderr.strip().splitlines()
    return next((line for line in lines if line.startswith("ERROR:")), lines[-1] if lines else "")


class Gcloud:
    """Builds gcloud commands for one slice and runs them, or prints them under --dry-run.
    With `local`, the per-worker job runs as a local subprocess instead of over ssh (for tests)."""

    def __init__(self, args):
        self.name, self.dry_run = args.name, args.dry_run
        self.accelerator_type: str | None = None  # the slice's, as the last `state()` read it
        self.local = getattr(args, "local", False)
        # A describe that fails for another reason than a missing resource (a token refresh, a 503)
        # is retried as scp/ssh are: one blip must not end a launch that waits or babysits for hours.
        self.retries = getattr(args, "retries", 4)
        self.retry_delay = getattr(args, "retry_delay", getattr(args, "poll", 10))
        self.zone = args.zone or os.environ.get("TPU_ZONE")
        self.project = args.project or os.environ.get("CLOUDSDK_CORE_PROJECT")
        if not self.zone and not self.local:
            raise LaunchError("no zone: pass --zone (e.g. us-east5-a) or set TPU_ZONE")
        if self.zone and not re.fullmatch(r"[a-z]+(-[a-z]+)+[0-9]+-[a-z]", self.zone):
            raise LaunchError(f"zone {self.zone!r} is not a Cloud zone's name, which reads like us-east5-a "
                              "(region, then a letter)")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
            raise LaunchError(f"{self.name!r} is not a name Cloud gives a TPU: lowercase letters, digits and "
                              "hyphens, at most 63, starting with a letter and not ending with a hyphen")

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def queued(self, verb: str, *extra: str, alpha: bool = False) -> list[str]:
        track = ["alpha"] if alpha else []
        return ["gcloud", *track, "compute", "tpus", "queued-resources", verb, self.name,
                *extra, *self._where()]

    def tpu_vm(self, verb: str, *extra: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *extra, *self._where()]

    def call(self, argv: list[str], retries: int = 1, delay: float = 0.0, done=None) -> None:
        """Run argv (echoed), retrying with exponential backoff; raise after the last failure.
        `done()`, asked after a failure, says whether what the call was to do happened anyway (a
        create whose reply was lost): then it is not retried."""
        print(shlex.join(argv), flush=True)
        if self.dry_run:
            return
        retries = max(retries, 1)
        for attempt in range(1, retries + 1):
            code = subprocess.run(argv).returncode
            if code == 0:
                return
            if done is not None and done():
                progress(f"exit {code}, but it was done")
                return
            if attempt < retries:
                wait = delay * 2 ** (attempt - 1)
                progress(f"exit {code}; retry {attempt}/{retries - 1} in {wait:.0f}s")
                time.sleep(wait)
        raise LaunchError(f"`{shlex.join(argv[:6])} ...` failed with exit code {code} "
                          f"after {retries} attempt(s)")

    def state(self) -> str | None:
        """The queued resource's state, or None if it does not exist; its accelerator type is
        kept in `self.accelerator_type` (None when it does not say)."""
        argv = self.queued("describe", "--format=value(state.state,tpu.nodeSpec[0].node.acceleratorType)")
        self.accelerator_type = None
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return None
        for attempt in range(1, max(self.retries, 1) + 1):
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode == 0:
                state, _, accelerator_type = result.stdout.strip().partition("\t")
                self.accelerator_type = accelerator_type.strip() or None
                return state.strip()
            if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
                return None
            if any(code in result.stderr for code in PERMANENT_ERRORS):  # no retry makes these pass
                break
            if attempt < self.retries:
                wait = self.retry_delay * 2 ** (attempt - 1)
                progress(f"describe {self.name} failed (exit {result.returncode}); retry {attempt}/"
                         f"{self.retries - 1} in {wait:.0f}s")
                time.sleep(wait)
        raise LaunchError(f"cannot describe {self.name} in {self.zone} (exit {result.returncode}): "
                          f"{gcloud_error(result.stderr)}")

    def worker_argv(self, worker: int, remote: str) -> list[str]:
        if self.local:
            return ["bash", "-c", remote]
        return self.tpu_vm("ssh", self.name, f"--worker={worker}", f"--command={remote}")


def progress(message: str) -> None:
    print(f"[tpu] {message}", file=sys.stderr, flush=True)


# --- commands --------------------------------------------------------------------------------

def create(gc: Gcloud, args, retries: int = 1, delay: float = 0.0) -> None:
    version = runtime_version(args.accelerator_type)  # checks the type even when the version is given
    version = args.runtime_version or version
    progress(f"creating {gc.name}: {args.accelerator_type} ({args.capacity}), runtime {version}")
    gc.call(gc.queued("create", f"--node-id={gc.name}", f"--accelerator-type={args.accelerator_type}",
                      f"--runtime-version={version}", *CAPACITY_FLAGS[args.capacity],
                      alpha=args.capacity == "best-effort"),  # --best-effort is alpha-only
            retries, delay, done=(lambda: gc.state() is not None) if retries > 1 else None)


def wait(gc: Gcloud, args) -> None:
    progress(f"waiting for {gc.name} to be ACTIVE")
    last = None
    while True:
        state = gc.state()
        if gc.dry_run or state == "ACTIVE":
            return
        if state is None:
            raise LaunchError(f"{gc.name} is missing in {gc.zone}: check the name, --zone and --project, or "
                              "create it (`tpu.py create`)")
        if state not in PENDING:
            raise LaunchError(f"{gc.name} is {state}, not ACTIVE: see "
                              f"`{shlex.join(gc.queued('describe'))}`; delete it and create it again")
        if state != last:
            progress(f"{gc.name} is {state}")
            last = state
        time.sleep(args.poll)


def status(gc: Gcloud, args) -> None:
    gc.call(gc.queued("describe"))


def delete(gc: Gcloud, args, retries: int = 1, delay: float = 0.0) -> None:
    progress(f"deleting {gc.name}")
    gc.call(gc.queued("delete", *(["--force"] if args.force else []), "--quiet"), retries, delay,
            done=(lambda: gc.state() is None) if retries > 1 else None)


def check_git_tree() -> None:
    """`setup` packs the code with git (ls-files or archive): a copy that is not a git checkout
    (unpacked from an archive) is refused before any slice is requested."""
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-inside-work-tree"], capture_output=True,
                          text=True)
    if done.returncode:
        why = next((line for line in done.stderr.splitlines() if line.strip()), "")
        if "not a git repository" in why:
            raise LaunchError(f"{REPO} is not a git checkout (git ls-files packs the code for the workers): "
                              "run tpu.py from a clone")
        # e.g. "detected dubious ownership": a clone owned by another user, which git's own advice fixes
        raise LaunchError(f"git cannot read {REPO} ({why.removeprefix('fatal: ')}); see `git -C {REPO} status`")


def shipped_files(*paths: str) -> list[str]:
    """The working tree's files that `setup` packs (tracked and untracked, not ignored), relative
    to REPO; with `paths`, those among them."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                             "--", *paths], check=True, capture_output=True, text=True)
    return [path for path in listed.stdout.split("\0") if path]


def check_commit(commit: str | None) -> None:
    if commit and subprocess.run(["git", "-C", str(REPO), "rev-parse", "--quiet", "--verify", f"{commit}^{{commit}}"],
                                 capture_output=True).returncode:
        raise LaunchError(f"--commit {commit!r} is not a commit of {REPO}; give a branch, tag or hash")


def pack(commit: str | None, dest: Path, dry_run: bool, leave_out: Path | None = None) -> None:
    """A gzipped tarball of the working tree (tracked and untracked, not ignored files, except
    the launcher's logs under `leave_out`, its --log-dir) or of one commit (checked before any gcloud
    call: `check_before_calling`), so uncommitted edits reach the workers without a push."""
    what = f"commit {commit}" if commit else "the working tree (git ls-files)"
    progress(f"packing {what} into {dest}")
    if dry_run:
        return
    if commit:
        archived = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={dest}",
                                   commit], capture_output=True, text=True)
        if archived.returncode:
            dest.unlink(missing_ok=True)
            raise LaunchError(f"--commit {commit!r}: git archive failed in {REPO}: "
                              f"{(archived.stderr.strip().splitlines() or ['no message'])[-1]}")
        return
    listed = shipped_files()
    untracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--others", "--exclude-standard"],
                               check=True, capture_output=True, text=True).stdout.split("\0")
    paths = [path for path in listed
             if (REPO / path).is_file() and not is_launcher_log(REPO / path, leave_out)]  # deleted, tracked: skipped
    shipped = sorted(set(paths) & set(untracked))
    if shipped:  # not in git and not ignored: say which, in case one is a key or a .env
        progress(f"packing {len(shipped)} untracked file(s) too (git ignores none of them): "
                 + ", ".join(shipped[:10]) + (", ..." if len(shipped) > 10 else ""))
    with tarfile.open(dest, "w:gz") as tar:
        for path in paths:
            tar.add(REPO / path, arcname=path)


def is_launcher_log(path: Path, log_dir: Path | None) -> bool:
    """Whether `path` is one of the launcher's logs: launch's LOG_DIR/RUN_ID/attempt-K/worker-N.log,
    or run's LOG_DIR/worker-N.log."""
    path = path.resolve()
    if log_dir is None or not path.is_relative_to(log_dir):
        return False
    return re.fullmatch(r"([^/]+/attempt-\d+/)?worker-\d+\.log", path.relative_to(log_dir).as_posix()) is not None


@contextlib.contextmanager
def packed(gc: Gcloud, args):
    """The code packed (`pack`) into a temporary tarball that this user alone can read (the tree
    may hold keys), removed on leaving."""
    if gc.dry_run:
        tarball = Path(tempfile.gettempdir()) / f"qed-jax-{gc.name}-XXXXXXXX.tar.gz"
    else:
        fd, name = tempfile.mkstemp(prefix=f"qed-jax-{gc.name}-", suffix=".tar.gz")
        os.close(fd)
        tarball = Path(name)
    log_dir = getattr(args, "log_dir", None)  # launch's: its logs stay here
    try:
        pack(args.commit, tarball, gc.dry_run, Path(log_dir).resolve() if log_dir else None)
        yield tarball
    finally:
        if not gc.dry_run:
            tarball.unlink(missing_ok=True)


def setup(gc: Gcloud, args, tarball: Path | None = None) -> None:
    """Copy the code to every worker and install it: `tarball` when given (`launch` packs once, so
    that a slice created again after a preemption gets the same code), else packed anew."""
    if tarball and not gc.dry_run and not tarball.exists():
        raise LaunchError(f"the code packed at the launch's start, {tarball}, is gone (a cleaner of temporary "
                          "files?): launch again with the same --run-id, which packs it again")
    with contextlib.nullcontext(tarball) if tarball else packed(gc, args) as tarball:
        progress(f"copying the code to every worker of {gc.name} and installing it")
        gc.call(gc.tpu_vm("scp", str(tarball), f"{gc.name}:qed-jax.tar.gz", "--worker=all"),
                args.retries, args.retry_delay)
    # The setup script travels inside the tarball, so unpack it from there first.
    remote = ("tar -xzf qed-jax.tar.gz -O tpu_scripts/worker_setup.sh > qed-jax-setup.sh && "
              "bash qed-jax-setup.sh qed-jax.tar.gz")
    gc.call(gc.tpu_vm("ssh", gc.name, "--worker=all", f"--command={remote}"),
            args.retries, args.retry_delay)


def positive(kind):
    """An argparse type: a number of `kind` (int or float) above 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def not_negative(kind):
    """An argparse type: a number of `kind` (int or float), 0 or more."""
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def env_pair(pair: str) -> tuple[str, str]:
    """One --env KEY=VALUE (an argparse type: a bad one is a usage error)."""
    key, sep, value = pair.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a shell variable name, got {pair!r}")
    return key, value


def remote_command(gc: Gcloud, worker: int, command: list[str], env: dict[str, str]) -> str:
    home = shlex.quote(str(REPO)) if gc.local else REMOTE_HOME
    env = {"QED_WORKER_ID": str(worker), **env}
    if gc.local:  # fake workers: this interpreter's venv, and leave local processes alone
        env |= {"QED_VENV": sys.prefix, "QED_LOCAL_WORKER": "1"}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"cd {home} && {assignments} bash tpu_scripts/worker_run.sh {shlex.join(command)}"


def run(gc: Gcloud, args, log_dir: Path | None = None) -> int:
    """Run args.command on every worker at once, one log file per worker; as soon as one worker
    fails, stop the others. Returns the failing worker's exit code (255: ssh lost), or 0."""
    log_dir = Path(log_dir or args.log_dir)
    workers = num_workers(args.accelerator_type)
    env = dict(args.env)
    argvs = [gc.worker_argv(w, remote_command(gc, w, args.command, env)) for w in range(workers)]
    progress(f"running on {workers} worker(s) of {gc.name}; logs in {log_dir}/worker-N.log")
    if gc.dry_run:
        for w, argv in enumerate(argvs):
            print(f"{shlex.join(argv)} > {shlex.quote(f'{log_dir}/worker-{w}.log')} 2>&1 &")
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    try:  # a stop while the workers start stops those already started
        for w, argv in enumerate(argvs):
            with open(log_dir / f"worker-{w}.log", "wb") as log:
                # Own process group, so stopping a worker also stops what its shell started.
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            failed = [w for w, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                w = failed[0]
                code = codes[w] if codes[w] > 0 else 128 - codes[w]  # killed by signal N: 128 + N, as a shell says
                progress(f"worker {w} failed with exit code {code}; stopping the others. "
                         f"Last lines of {log_dir}/worker-{w}.log:")
                tail = (log_dir / f"worker-{w}.log").read_text(errors="replace").splitlines()[-20:]
                print("\n".join(tail), file=sys.stderr, flush=True)
                return code
            if all(c == 0 for c in codes):
                progress(f"all {workers} worker(s) finished")
                return 0
            time.sleep(0.2)
    finally:
        stop(procs)


def check_slice_type(gc: Gcloud, args) -> None:
    """The slice, as the last `state()` read it, is of --accelerator-type (when it says): one of
    another size would run the job on the wrong number of workers."""
    if gc.accelerator_type and gc.accelerator_type != args.accelerator_type:
        raise LaunchError(f"{gc.name} exists as a {gc.accelerator_type} slice, not {args.accelerator_type}: its "
                          f"workers would not match the job's; give --accelerator-type {gc.accelerator_type}, "
                          "or another name")


def check_active(gc: Gcloud) -> None:
    """The slice is ACTIVE (a describe): scp or ssh into one that is missing or not ready fails on
    every worker, after retries."""
    state = gc.state()
    if state != "ACTIVE":
        raise LaunchError(f"{gc.name} is {state or 'missing'} in {gc.zone}, not ACTIVE: check the name, "
                          "--zone and --project, or `tpu.py wait` for it")


def setup_command(gc: Gcloud, args) -> None:
    """`tpu.py setup`: `setup` on a slice checked to be ACTIVE (`launch` waits for it itself)."""
    if not gc.dry_run:
        check_active(gc)
    setup(gc, args)


def run_command(gc: Gcloud, args) -> int:
    """`tpu.py run`: `run` on a slice checked to be ACTIVE and of --accelerator-type (`launch`
    checks it itself)."""
    if not (gc.local or gc.dry_run):
        check_active(gc)
        check_slice_type(gc, args)
    return run(gc, args)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each still-running worker's process group, SIGKILL what outlives 10 s. Killing
    the local ssh does not always end the remote job: worker_run.sh clears it on the next run."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
        try:
            for p in procs:
                p.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(gc: Gcloud, args) -> int:
    """Create if missing, wait, set up, run; after a failure, a preempted slice is recreated and
    the same command restarted (it resumes from its checkpoint_dir), while other failures retry
    on the same slice. The two have separate budgets."""
    preemptions = failures = 0
    needs_setup = True
    run_dir = Path(args.log_dir) / args.run_id
    # A run launched again with its --run-id numbers its attempts on from the last one's logs.
    attempt = max((int(d.name.split("-")[1]) for d in run_dir.glob("attempt-*") if d.name.split("-")[1].isdigit()),
                  default=0)
    first = attempt
    args.env = [*args.env, ("QED_RUN_ID", args.run_id)]

    def preempted(state: str | None, during: str) -> bool:
        """Whether the slice is gone or preempted (counted against --max-preemptions)."""
        nonlocal preemptions
        if state is not None and state not in PREEMPTED:
            return False
        preemptions += 1
        progress(f"{gc.name} was preempted ({state or 'gone'}, {during}): "
                 f"preemption {preemptions}/{args.max_preemptions}")
        if preemptions >= args.max_preemptions:
            raise LaunchError(f"{gc.name} was preempted {preemptions} times; giving up "
                              "(raise --max-preemptions to keep trying)")
        return True

    # Packed once, at the start: a slice created again after a preemption, maybe days later, gets
    # the same code (not edits made since, nor a --commit branch that moved on).
    with packed(gc, args) as tarball:
        while True:
            state = gc.state()
            if state in PREEMPTED or state == "FAILED":
                progress(f"{gc.name} is {state}: deleting it to create it again")
                gc.call(gc.queued("delete", "--force", "--quiet"), args.retries, args.retry_delay)
                state = None
            if state is None:  # retried: one blip must not end a launch that recovers from preemptions
                create(gc, args, args.retries, args.retry_delay)
                needs_setup = True
            else:
                check_slice_type(gc, args)
            try:
                wait(gc, args)
                if needs_setup:
                    setup(gc, args, tarball)
                    needs_setup = False
            except LaunchError as e:  # a slice preempted before the job starts is created again too
                if gc.dry_run or not preempted(gc.state(), f"while it was set up: {e}"):
                    raise
                needs_setup = True
                continue
            attempt += 1
            code = run(gc, args, run_dir / f"attempt-{attempt}")
            if code == 0:
                break
            state = gc.state()
            if not preempted(state, f"exit {code}"):
                failures += 1
                progress(f"the job failed with exit code {code} on an {state} slice: "
                         f"failure {failures}/{args.max_failures}")
                if failures >= args.max_failures:
                    raise LaunchError(f"the job failed {failures} times (last exit code {code}); logs "
                                      f"in {run_dir}. Fix it, then launch again with --run-id {args.run_id}")
    if gc.dry_run:
        progress(f"{args.run_id}: the dry run stops here; a launch repeats the job until it succeeds")
    else:
        progress(f"{args.run_id} finished after {attempt - first} attempt(s), {preemptions} preemption(s)")
    if args.delete_at_end:
        delete(gc, argparse.Namespace(force=True), args.retries, args.retry_delay)
    return 0


# --- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="queued resource and TPU name (one name for both)")
    common.add_argument("--zone", help="zone, e.g. us-east5-a (default: $TPU_ZONE)")
    common.add_argument("--project", help="project (default: $CLOUDSDK_CORE_PROJECT, else gcloud's)")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    slice_ = argparse.ArgumentParser(add_help=False)
    # Required, but checked after the unrecognized options (`main`): argparse would report a
    # misspelt --accelerator-type as missing and never name the typo.
    slice_.add_argument("--accelerator-type",
                        help="required: v4-N, v5litepod-N, v5p-N or v6e-N, e.g. v5p-64 (8 hosts)")
    creating = argparse.ArgumentParser(add_help=False)
    creating.add_argument("--capacity", choices=CAPACITY_FLAGS, default="spot",
                          help="spot (preemptible, default), reserved, on-demand or best-effort")
    creating.add_argument("--runtime-version",
                          help="TPU software version (default per generation: "
                          + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    polling = argparse.ArgumentParser(add_help=False)
    polling.add_argument("--poll", type=not_negative(float), default=30, help="seconds between state checks (default: %(default)s)")
    copying = argparse.ArgumentParser(add_help=False)
    copying.add_argument("--commit", help="copy this commit (git archive) instead of the working tree")
    copying.add_argument("--retries", type=positive(int), default=4,
                         help="attempts for each scp/ssh step and state check, and launch's create and delete "
                         "(default: %(default)s)")
    copying.add_argument("--retry-delay", type=not_negative(float), default=10,
                         help="seconds before the first retry, doubling each time (default: %(default)s)")
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", type=env_pair,
                         help="environment variable for the job on every worker (repeatable)")
    running.add_argument("--log-dir", default="tpu_logs",
                         help="local folder for per-worker logs (default: %(default)s)")

    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0],
                                     epilog="example:\n" + __doc__.split("\n\n")[1] + "\n\n"
                                     "`tpu.py COMMAND --help` documents each command.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    def add(verb, func, parents, summary, description):
        usage = f"tpu.py {verb} NAME [options]" + (" -- COMMAND [ARG...]" if running in parents else "")
        p = sub.add_parser(verb, parents=[common, *parents], help=summary, description=description,
                           usage=usage)
        p.set_defaults(func=func, parser=p)  # `parser`: for errors in the command's own usage
        return p

    add("create", create, [slice_, creating], "request a TPU VM or pod slice (queued resource)",
        "Request a slice through `gcloud compute tpus queued-resources create`; returns at once "
        "(use `wait`).")
    add("wait", wait, [polling], "wait until the slice is ACTIVE",
        "Poll the queued resource until ACTIVE; fail on any state that does not lead there (FAILED, "
        "SUSPENDING, SUSPENDED, PREEMPTED) or a missing resource.")
    add("status", status, [], "describe the queued resource", "Print `queued-resources describe`.")
    p = add("delete", delete, [], "delete the queued resource",
            "Delete the queued resource; --force also deletes its TPU VMs.")
    p.add_argument("--force", action="store_true", help="also delete the TPU VMs of the slice")
    add("setup", setup_command, [copying], "copy the code to every worker and install it",
        "Pack the working tree (or --commit), copy it to every worker of the slice (which must be "
        "ACTIVE: a describe checks it), and install it with the `tpu` extra into ~/qed-jax-venv "
        "(tpu_scripts/worker_setup.sh). Safe to repeat.")
    p = add("run", run_command, [slice_, running], "run one command on every worker at once",
            "Run the command after `--` on every worker in parallel (one ssh per worker), one log per "
            "worker under --log-dir; end every worker's ssh as soon as one fails. The slice must be ACTIVE and of "
            "--accelerator-type (a describe checks it). Stale TPU processes (ending an ssh does not "
            "always end its job) and the libtpu lock file are cleared first (tpu_scripts/worker_run.sh).")
    p.add_argument("--local", action="store_true",
                   help="run each 'worker' as a local subprocess instead of over ssh (testing)")
    p = add("launch", launch, [slice_, creating, polling, copying, running],
            "create, set up and run a job to completion through preemptions",
            "Create the slice if missing, wait, set up, run in the foreground. When the job fails "
            "on a preempted slice (SUSPENDING, SUSPENDED, PREEMPTED, or gone), delete and recreate it and "
            "restart the same command (which resumes from its checkpoint_dir); other failures "
            "retry on the same slice. Logs: LOG_DIR/RUN_ID/attempt-K/worker-N.log.")
    p.add_argument("--run-id", default=time.strftime("run-%Y%m%d-%H%M%S", time.gmtime()),
                   help="names the log folder and is passed to the job as $QED_RUN_ID "
                   "(default: run-UTCDATE-TIME); reuse it to continue a run")
    p.add_argument("--max-preemptions", type=positive(int), default=20,
                   help="give up after this many preemptions (default: %(default)s)")
    p.add_argument("--max-failures", type=positive(int), default=3,
                   help="give up after this many ordinary (non-preemption) failures (default: %(default)s)")
    p.add_argument("--delete-at-end", action="store_true", help="delete the slice after success")
    return parser


def suggested_flag(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """' (did you mean --zone?)' for the first of `unknown` that is close to one of the command's
    flags; '' when none is. (qed_jax.cli.suggested_flags does this for qed-jax; this script runs
    without the package installed.)"""
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    for given in (x.split("=")[0] for x in unknown if x.startswith("--")):
        close = difflib.get_close_matches(given, flags, n=1)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def check_before_calling(args) -> None:
    """What can be checked before the first gcloud call: no slice is requested for a job that
    cannot start."""
    if getattr(args, "accelerator_type", None):
        num_workers(args.accelerator_type)
    run_id = getattr(args, "run_id", None)
    if run_id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_id):
        raise LaunchError(f"--run-id {run_id!r} names a folder under --log-dir: use letters, digits, '.', '_' and "
                          "'-', starting with a letter or digit")
    if args.verb in ("setup", "launch"):
        check_git_tree()
    check_commit(getattr(args, "commit", None))
    if args.verb in ("run", "launch") and not args.command:
        raise LaunchError("no command: put it after `--`, e.g. -- qed-jax sft --config C --distributed")
    if args.verb not in ("run", "launch") and args.command:  # e.g. `create ... -- --capacity reserved`
        raise LaunchError(f"{args.verb} runs no command, so nothing goes after `--` (got "
                          f"{shlex.join(args.command)!r}): put its options before `--`")
    if "--dry-run" in args.command:  # the job's argument: the launcher itself would really run
        raise LaunchError("--dry-run after `--` goes to the job, and the launcher would run for real: put it "
                          "before `--`")
    if args.verb == "launch" and not args.commit:
        check_job_command(args.command, num_workers(args.accelerator_type))


def check_job_command(command: list[str], workers: int) -> None:
    """A launched `qed-jax ...` job read here by qed-jax's own parser (this checkout's: the code
    `launch` sets the workers up with, without --commit), and its --config looked for in the
    checkout (the workers run from its copy): a misspelt command, flag or config path, or a
    trainer on several hosts without --distributed, is refused before a slice is requested, not
    after one is set up. The parser needs nothing beyond the standard library."""
    if not command or os.path.basename(command[0]) != "qed-jax":
        return
    sys.path.insert(0, str(REPO))
    try:
        from qed_jax.cli import parse_args
    except (ImportError, SyntaxError):  # a checkout this Python cannot import: the workers' Python reads the job
        return
    finally:
        sys.path.remove(str(REPO))
    heard = io.StringIO()
    try:
        with contextlib.redirect_stderr(heard), contextlib.redirect_stdout(io.StringIO()):
            job = parse_args(command[1:])
    except SystemExit as e:
        if e.code:  # --help exits 0: nothing wrong with that
            error = next((line for line in reversed(heard.getvalue().splitlines()) if line.strip()), "")
            raise LaunchError(f"the job's command does not parse ({error}): `{shlex.join(command)}`") from None
        return
    if workers > 1 and getattr(job, "distributed", True) is False and not job.coordinator:
        raise LaunchError(f"`qed-jax {job.command}` on the {workers} hosts of this slice needs --distributed, which "
                          "joins their processes into one job: add it after `--`")
    config = getattr(job, "config", None)
    if config is None or os.path.isabs(config):  # an absolute path may be the workers' own
        return
    inside = (REPO / config).resolve()
    if "://" in config or not inside.is_relative_to(REPO) or not inside.is_file() \
            or not shipped_files(str(inside.relative_to(REPO))):
        raise LaunchError(f"the job's --config {config} is no file of {REPO} that `setup` copies to the workers "
                          "(tracked or untracked, not ignored by git): give one, relative to the checkout's top")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The job's own flags (--config, --distributed) must not reach this parser: split at `--`.
    split = argv.index("--") if "--" in argv else len(argv)
    args, unknown = build_parser().parse_known_args(argv[:split])
    if unknown:  # a typo, or an option of another command: say so under this command's usage
        hint = suggested_flag(args.parser, unknown)
        if args.verb in ("run", "launch") and not unknown[0].startswith("-"):  # a job without `--` before it
            hint = " (put the job's command after `--`)"
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if hasattr(args, "accelerator_type") and args.accelerator_type is None:
        args.parser.error("the following arguments are required: --accelerator-type")
    args.command = argv[split + 1:]
    try:
        check_before_calling(args)
        result = args.func(Gcloud(args), args)
    except LaunchError as e:
        print(f"tpu.py {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        if not e.filename or "/" in str(e.filename):  # a file, not a program to run (gcloud, git)
            raise
        hint = ": install the Google Cloud SDK (cloud.google.com/sdk)" if e.filename == "gcloud" else ""
        print(f"tpu.py {args.verb}: error: cannot run {e.filename} (not found on PATH){hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tpu.py {args.verb}: interrupted (the slice is left as it is)", file=sys.stderr)
        return 130
    return result or 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # so that the workers are stopped (`run`'s finally), as on Ctrl-C


if __name__ == "__main__":
    # A launcher killed (SIGTERM) or whose terminal closed (SIGHUP) stops its workers as Ctrl-C
    # does: they run in their own sessions, so nothing else would end their ssh jobs.
    # A signal ignored on purpose (`nohup tpu.py launch ... &`: SIGHUP) stays ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _interrupt)
    sys.exit(main())
