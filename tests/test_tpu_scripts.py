"""The pod launcher (tpu_scripts/tpu.py) against a fake `gcloud`, and its worker scripts run as
local fake workers. No network: the fake answers `describe` from a scripted list of states and
each worker's ssh job from a scripted list of exit codes, and logs every call."""

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
WHERE = ["--zone=us-east5-a", "--project=proj"]

spec = importlib.util.spec_from_file_location("tpu_launcher", SCRIPTS / "tpu.py")
tpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tpu)

FAKE_GCLOUD = r'''#!{python}
"""Fake gcloud: logs argv; `describe` pops the next scripted state; a worker's job (ssh running
worker_run.sh) pops that worker's next {{code, sleep, wait_for}}; scp, create and delete pop a
scripted exit code (0 when none is left)."""
import fcntl, json, sys, time
from pathlib import Path

home = Path({home!r})
argv = sys.argv[1:]


def locked(update):
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        script = json.loads((home / "script.json").read_text())
        result = update(script)
        (home / "script.json").write_text(json.dumps(script))
        return result


def pop(script, key, *path):
    items = script
    for step in (key, *path):
        items = items.get(step) if isinstance(items, dict) else None
    if not items:
        sys.exit(f"fake gcloud: nothing scripted left for {{[key, *path]}}: {{argv}}")
    return items.pop(0)


def log_and_pop(script):
    with open(home / "calls.jsonl", "a") as f:
        f.write(json.dumps(["gcloud", *argv]) + "\n")
    if "describe" in argv and any(a.startswith("--format=") for a in argv):
        return pop(script, "states")
    if "ssh" in argv and any("worker_run.sh" in a for a in argv):
        worker = next(a for a in argv if a.startswith("--worker=")).split("=")[1]
        script.setdefault("started", {{}})[worker] = script.get("started", {{}}).get(worker, 0) + 1
        return worker, pop(script, "runs", worker)
    if "scp" in argv:
        code = pop(script, "scp") if script.get("scp") else 0
        if code == 0:  # what the workers received
            source = next(a for a in argv if a.endswith(".tar.gz"))
            (home / "copied.tar.gz").write_bytes(Path(source).read_bytes())
            (home / "copied.mode").write_text(oct(Path(source).stat().st_mode & 0o777))
        return code
    for verb in ("create", "delete"):
        if verb in argv and script.get(verb):
            return pop(script, verb)
    return 0


answer = locked(log_and_pop)
if isinstance(answer, str):  # a state
    if answer == "MISSING":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found")
    if answer == "DENIED":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) PERMISSION_DENIED: Permission "
                 "'tpu.queuedResources.get' denied")
    if answer == "NO_ACCOUNT":  # gcloud's words, not logged in
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) You do not currently have an active "
                 "account selected.\nPlease run:\n\n  $ gcloud auth login\n\nto obtain new credentials.\n\nIf you "
                 "have already logged in with a different account, run:\n\n  $ gcloud config set account "
                 "ACCOUNT\n\nto select an already authenticated account to use.")
    if answer == "NO_PROJECT":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) Error parsing [queued_resource].\nThe "
                 "[queued_resource] resource is not properly specified.\nFailed to find attribute [project]. The "
                 "attribute can be set in the following ways: \n- provide the argument `--project` on the command "
                 "line\n- set the property `core/project`")
    if answer == "UNAVAILABLE":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) There was a problem refreshing your "
                 "current auth tokens")
    print(answer)
elif isinstance(answer, tuple):  # a worker's job
    worker, job = answer
    mine = locked(lambda s: s["started"][worker])
    # A failing worker waits until its peers have started this attempt too, so the next
    # attempt never sees a half-consumed script.
    for peer in job.get("wait_for", []):
        while locked(lambda s: s["started"].get(peer, 0)) < mine:
            time.sleep(0.05)
    print(f"worker {{worker}} started", flush=True)
    time.sleep(job.get("sleep", 0))
    print(f"worker {{worker}} done", flush=True)
    sys.exit(job["code"])
else:
    sys.exit(answer)
'''


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
    """Puts a fake gcloud first on PATH; returns (write_script, calls)."""
    home = tmp_path / "gcloud"
    home.mkdir()
    fake = home / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable, home=str(home)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{home}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    def write_script(**script):
        (home / "script.json").write_text(json.dumps(script))

    def calls():
        log = home / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    write_script()
    return write_script, calls


def launcher(*argv):
    return tpu.main([*argv])


def verbs(calls):
    """One word per gcloud call: what it did to the slice."""
    out = []
    for argv in calls:
        if "queued-resources" in argv:
            out.append(argv[argv.index("queued-resources") + 1])
        elif "scp" in argv:
            out.append("scp")
        elif "--worker=all" in argv:
            out.append("setup")
        else:
            out.append("run")
    return out


@pytest.mark.parametrize("accelerator, workers", [
    ("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v5p-8", 1), ("v5p-16", 2), ("v5p-64", 8),
    ("v5litepod-1", 1), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-256", 64),
    ("v6e-4", 1), ("v6e-8", 1), ("v6e-16", 4), ("v6e-256", 64)])
def test_workers_per_slice(accelerator, workers):
    assert tpu.num_workers(accelerator) == workers


def test_runtime_versions_and_bad_types():
    assert tpu.runtime_version("v5p-64") == "v2-alpha-tpuv5"
    assert tpu.runtime_version("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert tpu.runtime_version("v6e-8") == "v2-alpha-tpuv6e"
    assert tpu.runtime_version("v4-32") == "tpu-ubuntu2204-base"
    for bad in ("v3-8", "v5p", "v5e-8"):
        with pytest.raises(tpu.LaunchError, match="unknown accelerator type"):
            tpu.num_workers(bad)
    power_of_two = r"a power of two \(e\.g\. 8, 16 or 64\)"
    for bad, rule in (("v5p-7", "a positive multiple of 2"), ("v4-0", "a positive multiple of 2"),
                      ("v6e-0", power_of_two), ("v6e-12", power_of_two), ("v5litepod-24", power_of_two)):
        with pytest.raises(tpu.LaunchError, match=f"^{bad}: no such slice; .* so N is {rule}$"):
            tpu.num_workers(bad)


def test_create_and_delete_commands(gcloud):
    _, calls = gcloud
    assert launcher("create", "qr", *WHERE, "--accelerator-type", "v5p-64", "--capacity", "spot") == 0
    assert launcher("create", "qr", *WHERE, "--accelerator-type", "v6e-8", "--capacity", "best-effort",
                    "--runtime-version", "v2-custom") == 0
    assert launcher("create", "qr", *WHERE, "--accelerator-type", "v4-8", "--capacity", "on-demand") == 0
    assert launcher("delete", "qr", *WHERE, "--force") == 0
    qr = ["compute", "tpus", "queued-resources"]
    assert calls() == [
        ["gcloud", *qr, "create", "qr", "--node-id=qr", "--accelerator-type=v5p-64",
         "--runtime-version=v2-alpha-tpuv5", "--spot", *WHERE],
        ["gcloud", "alpha", *qr, "create", "qr", "--node-id=qr", "--accelerator-type=v6e-8",
         "--runtime-version=v2-custom", "--best-effort", *WHERE],
        ["gcloud", *qr, "create", "qr", "--node-id=qr", "--accelerator-type=v4-8",
         "--runtime-version=tpu-ubuntu2204-base", *WHERE],
        ["gcloud", *qr, "delete", "qr", "--force", "--quiet", *WHERE]]


def test_wait_passes_pending_states_and_fails_on_failed(gcloud, capsys):
    write_script, calls = gcloud
    write_script(states=["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    assert launcher("wait", "qr", *WHERE, "--poll", "0") == 0
    assert calls()[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "qr",
                          "--format=value(state.state,tpu.nodeSpec[0].node.acceleratorType)", *WHERE]
    assert verbs(calls()) == ["describe"] * 4
    write_script(states=["PROVISIONING", "FAILED"])
    assert launcher("wait", "qr", *WHERE, "--poll", "0") == 1
    assert "qr is FAILED, not ACTIVE" in capsys.readouterr().err


def test_wait_for_a_missing_slice_says_what_to_check_not_to_delete_it(gcloud, capsys):
    write_script, calls = gcloud
    write_script(states=["MISSING"])
    assert launcher("wait", "qr", *WHERE, "--poll", "0") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tpu.py wait: error: qr is missing in us-east5-a: check the name, --zone and --project, or create it "
        "(`tpu.py create`)")


def test_a_describe_that_fails_once_does_not_end_a_launch(gcloud, tmp_path):
    """A slice may wait hours for spot capacity: one failed describe (a token refresh, a 503)
    while waiting is retried, as scp and ssh are, instead of ending the launch."""
    write_script, calls = gcloud
    write_script(states=["MISSING", "WAITING_FOR_RESOURCES\tv5p-8", "UNAVAILABLE", "ACTIVE\tv5p-8"],
                 runs={"0": [{"code": 0}]})
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--retry-delay", "0",
                    "--run-id", "r", "--log-dir", str(tmp_path / "logs"), "--", "true") == 0
    assert verbs(calls()) == ["describe", "create", "describe", "describe", "describe", "scp", "setup", "run"]
    write_script(states=["UNAVAILABLE"] * 4)  # --retries defaults to 4
    assert launcher("wait", "qr", *WHERE, "--poll", "0") == 1  # not forever: the last failure is reported
    write_script(states=["DENIED", "ACTIVE\tv5p-8"])  # a missing permission: no retry cures it
    assert launcher("wait", "qr", *WHERE, "--poll", "0") == 1


@pytest.mark.parametrize("state, says", [
    ("DENIED", "ERROR: (gcloud.compute.tpus.queued-resources.describe) PERMISSION_DENIED: Permission "
               "'tpu.queuedResources.get' denied"),
    ("NO_ACCOUNT", "gcloud has no active account: run `gcloud auth login`"),
    ("NO_PROJECT", "no project: pass --project, or set CLOUDSDK_CORE_PROJECT")])
def test_a_describe_that_no_retry_cures_is_reported_at_once_in_gclouds_words_or_with_advice(gcloud, capsys, state,
                                                                                            says):
    """gcloud not logged in, or without a project, fails every retry alike (minutes of backoff
    at `wait`'s default poll), and its last line ("to select an already authenticated account to
    use.") says nothing alone."""
    write_script, calls = gcloud
    write_script(states=[state, "ACTIVE\tv5p-8"])
    assert launcher("wait", "qr", *WHERE, "--poll", "30") == 1
    assert verbs(calls()) == ["describe"]  # no retry, so no wait
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tpu.py wait: error: cannot describe qr in " \
        f"us-east5-a (exit 1): {says}"


def running(command_line: str) -> list[str]:
    """The pids of the processes whose command line is exactly `command_line`."""
    return subprocess.run(["pgrep", "-f", f"^{command_line}$"], capture_output=True, text=True).stdout.split()


def wait_until(condition, within_s: float = 30) -> None:
    """Polls `condition` until it holds or `within_s` has passed (the caller asserts it after)."""
    import time

    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_launcher_killed_stops_its_workers(tmp_path, sig):
    """Workers run in their own sessions: a launcher ended by SIGTERM or SIGHUP (its terminal
    closed) must stop them as Ctrl-C does, not leave their jobs running."""
    import os
    import signal
    import time
    marker = f"sleep 6{os.getpid() % 1000}"
    # A launcher keeps a signal it was started ignoring (`nohup`), as is the tests' under nohup:
    # it starts here with the signal's default, as from a terminal.
    inherited = signal.signal(getattr(signal, sig), signal.SIG_DFL)
    try:
        proc = subprocess.Popen([sys.executable, str(SCRIPTS / "tpu.py"), "run", "qr", "--local",
                                 "--accelerator-type", "v5p-16", "--log-dir", str(tmp_path / "logs"), "--",
                                 *marker.split()], stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(getattr(signal, sig), inherited)
    try:
        wait_until(lambda: len(running(marker)) == 2)  # both workers' jobs started
        time.sleep(1)  # and the launcher past starting them (a stop then is the next test's)
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=30)
        wait_until(lambda: not running(marker))  # their sessions got the signal too: gone soon
        assert code == 130 and "interrupted" in proc.stderr.read()
        assert running(marker) == []
    finally:
        for pid in running(marker):  # do not leave them behind on a failure
            os.kill(int(pid), signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_a_stop_while_the_workers_start_stops_those_started(tmp_path, monkeypatch):
    """Ctrl-C (or a SIGTERM, SIGHUP) that lands while the launcher starts its workers one by one:
    those already started, each in its own session, are stopped too."""
    import os
    import signal

    marker = f"sleep 8{os.getpid() % 1000}"
    real_popen, started = subprocess.Popen, []

    def popen_then_stop(*args, **kwargs):
        if started:  # the second worker: stopped before it starts
            raise KeyboardInterrupt
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(tpu.subprocess, "Popen", popen_then_stop)
    try:
        assert launcher("run", "qr", "--local", "--accelerator-type", "v5p-16", "--log-dir", str(tmp_path / "logs"),
                        "--", *marker.split()) == 130
        monkeypatch.undo()  # Popen as it was, for pgrep
        assert len(started) == 1 and started[0].poll() is not None  # stopped, and reaped
        wait_until(lambda: not running(marker))  # the sleep its shell started got the same signal
        assert running(marker) == []
    finally:
        monkeypatch.undo()
        for pid in running(marker):  # do not leave it behind on a failure
            os.kill(int(pid), signal.SIGKILL)


def test_a_copy_that_is_not_a_git_checkout_requests_no_slice(gcloud, tmp_path, monkeypatch):
    """The code is packed with git: from a copy unpacked from an archive, launch must say so
    before it creates (and waits for) a slice, not crash with a traceback once it is ACTIVE."""
    _, calls = gcloud
    copy = tmp_path / "copy"
    (copy / "tpu_scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / "tpu.py", copy / "tpu_scripts")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for verb in (["setup", "qr"], ["launch", "qr", "--accelerator-type", "v5p-8", "--poll", "0"]):
        done = subprocess.run([sys.executable, str(copy / "tpu_scripts" / "tpu.py"), *verb, *WHERE, "--", "true"][
            : None if verb[0] == "launch" else -2], capture_output=True, text=True)
        assert done.returncode == 1 and calls() == []
        assert done.stderr.strip().splitlines() == [
            f"tpu.py {verb[0]}: error: {copy} is not a git checkout (git ls-files packs the code for the workers): "
            "run tpu.py from a clone"]


def test_zone_is_required(gcloud, capsys, monkeypatch):
    monkeypatch.delenv("TPU_ZONE", raising=False)
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    assert launcher("status", "qr") == 1
    assert "no zone: pass --zone" in capsys.readouterr().err
    monkeypatch.setenv("TPU_ZONE", "europe-west4-a")
    assert launcher("status", "qr") == 0
    assert gcloud[1]()[-1][-1] == "--zone=europe-west4-a"


def test_names_cloud_would_refuse_and_a_run_id_outside_the_log_dir_are_refused_before_any_call(gcloud, capsys):
    calls = gcloud[1]
    refusals = {("create", "Foo_Bar", "--zone", "us-east5-a", "--accelerator-type", "v5p-8"):
                "'Foo_Bar' is not a name Cloud gives a TPU: lowercase letters, digits and hyphens, at most 63, "
                "starting with a letter and not ending with a hyphen",
                ("status", "qr", "--zone", "useast5"):
                "zone 'useast5' is not a Cloud zone's name, which reads like us-east5-a (region, then a letter)",
                ("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--run-id", "../../x y", "--", "true"):
                "--run-id '../../x y' names a folder under --log-dir: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"}
    for args, message in refusals.items():
        assert launcher(*args) == 1
        assert capsys.readouterr().err.strip().splitlines() == [f"tpu.py {args[0]}: error: {message}"]
    assert calls() == []
    assert launcher("status", "qr-2", "--zone", "northamerica-northeast1-a") == 0


def test_setup_copies_the_tree_and_retries_scp(gcloud, tmp_path):
    write_script, calls = gcloud
    write_script(states=["ACTIVE\tv5p-8"], scp=[255, 0])  # the first copy fails like a flaky connection
    assert launcher("setup", "qr", *WHERE, "--retry-delay", "0") == 0
    assert verbs(calls()) == ["describe", "scp", "scp", "setup"]
    tarball = Path(calls()[1][5])
    assert tarball.parent == tmp_path and tarball.name.startswith("qed-jax-qr-") and tarball.name.endswith(".tar.gz")
    scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball), "qr:qed-jax.tar.gz",
           "--worker=all", *WHERE]
    assert calls()[1:3] == [scp, scp]
    ssh = calls()[3]
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qr", "--worker=all"]
    assert "bash qed-jax-setup.sh qed-jax.tar.gz" in ssh[7]
    # The tree may hold keys: the tarball was this user's alone, and is gone once copied.
    assert (tmp_path / "gcloud/copied.mode").read_text() == "0o600" and not tarball.exists()
    names = tarfile.open(tmp_path / "gcloud/copied.tar.gz").getnames()
    assert {"pyproject.toml", "tpu_scripts/worker_setup.sh", "qed_jax/cli.py"} <= set(names)
    assert not any(n.startswith((".git/", ".venv/")) for n in names)


def test_setup_of_a_slice_that_is_missing_is_one_line_before_any_copy(gcloud, capsys):
    """A misspelt name or zone would fail each scp, retried with backoff, in gcloud's words."""
    write_script, calls = gcloud
    write_script(states=["MISSING"])
    assert launcher("setup", "qr", *WHERE, "--retry-delay", "0") == 1
    assert verbs(calls()) == ["describe"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tpu.py setup: error: qr is missing in us-east5-a, not ACTIVE: check the name, --zone and --project, or "
        "`tpu.py wait` for it")


def test_an_option_of_another_command_is_refused_under_this_commands_usage(gcloud, capsys):
    with pytest.raises(SystemExit) as exit_:
        launcher("setup", "qr", *WHERE, "--accelerator-type", "v5p-8")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: tpu.py setup NAME [options]", "tpu.py setup: error: unrecognized arguments: --accelerator-type v5p-8"]


def test_launch_has_no_local_workers(gcloud, capsys):
    """`--local` is `run`'s: a launch with it would request a real slice, set it up and then run
    the job here instead of on it."""
    _, calls = gcloud
    with pytest.raises(SystemExit) as exit_:
        launcher("launch", "qr", *WHERE, "--local", "--accelerator-type", "v5p-8", "--", "true")
    assert exit_.value.code == 2 and calls() == []
    assert "tpu.py launch: error: unrecognized arguments: --local" in capsys.readouterr().err


def test_a_misspelt_required_flag_is_named_with_the_flag_it_resembles(gcloud, capsys):
    _, calls = gcloud
    for argv, error in [
            (["--acclerator-type", "v5p-8"],
             "unrecognized arguments: --acclerator-type v5p-8 (did you mean --accelerator-type?)"),
            ([], "the following arguments are required: --accelerator-type")]:
        with pytest.raises(SystemExit) as exit_:
            launcher("create", "qr", *WHERE, *argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"tpu.py create: error: {error}"
    assert calls() == []


@pytest.mark.parametrize("verb", ["run", "launch"])
def test_a_job_without_dashes_before_it_is_told_where_it_goes(gcloud, capsys, verb):
    """Its flags would otherwise be taken for misspelt launcher flags (--config: "did you mean --commit?")."""
    _, calls = gcloud
    with pytest.raises(SystemExit) as exit_:
        launcher(verb, "qr", *WHERE, "--accelerator-type", "v5p-8", "qed-jax", "sft", "--config", "c.yaml")
    assert exit_.value.code == 2 and calls() == []
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"tpu.py {verb}: error: unrecognized arguments: qed-jax sft --config c.yaml (put the job's command after `--`)")


def test_setup_from_a_commit_that_does_not_exist_is_one_line_and_packs_nothing(gcloud, capsys):
    _, calls = gcloud
    for dry_run in ([], ["--dry-run"]):
        assert launcher("setup", "qr-bad", *WHERE, "--commit", "no-such-ref", *dry_run) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"tpu.py setup: error: --commit 'no-such-ref' is not a commit of {REPO}; give a branch, tag or hash")
    assert calls() == [] and not list(Path(tempfile.gettempdir()).glob("qed-jax-qr-bad*"))


def test_the_launchers_own_logs_are_not_packed(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "qed_jax").mkdir(parents=True)
    (repo / "qed_jax/cli.py").write_text("")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    (repo / "notes.txt").write_text("untracked, not ignored: travels")
    (repo / "my_logs/r/attempt-1").mkdir(parents=True)
    (repo / "my_logs/r/attempt-1/worker-0.log").write_text("")
    (repo / "my_logs/README").write_text("not a log of the launcher's: travels")
    (repo / "my_logs/worker-0.log").write_text("")  # `run`'s, in the same folder
    monkeypatch.setattr(tpu, "REPO", repo)
    tpu.pack(None, tmp_path / "code.tar.gz", dry_run=False, leave_out=(repo / "my_logs").resolve())
    assert sorted(tarfile.open(tmp_path / "code.tar.gz").getnames()) == ["my_logs/README", "notes.txt",
                                                                         "qed_jax/cli.py"]
    # A log folder that holds the repository (--log-dir ~, or . from the repository's root)
    # leaves out its logs, not the code (everything was left out: an empty tarball).
    (repo / "r2/attempt-3").mkdir(parents=True)
    (repo / "r2/attempt-3/worker-12.log").write_text("")
    tpu.pack(None, tmp_path / "code.tar.gz", dry_run=False, leave_out=repo.resolve())
    names = tarfile.open(tmp_path / "code.tar.gz").getnames()
    assert "qed_jax/cli.py" in names and "r2/attempt-3/worker-12.log" not in names
    tpu.pack(None, tmp_path / "code.tar.gz", dry_run=False, leave_out=tmp_path.resolve())
    assert "qed_jax/cli.py" in tarfile.open(tmp_path / "code.tar.gz").getnames()


def test_launch_checks_its_command_and_slice_before_requesting_one(gcloud, capsys):
    _, calls = gcloud
    for argv, message in (([], "no command: put it after `--`"),
                          (["--", "true"], "v5p-12 has 6 chips, not a multiple of 4 per host")):
        accelerator = "v5p-12" if argv else "v5p-8"
        assert launcher("launch", "qr", *WHERE, "--accelerator-type", accelerator, "--poll", "0", *argv) == 1
        assert message in capsys.readouterr().err
    # A qed-jax job is read by qed-jax's own parser and its config looked for in the checkout.
    for job, message in (
            (["qed-jax", "sfy", "--config", "configs/sft/tiny.yaml"],
             "the job's command does not parse (qed-jax: error: argument COMMAND: invalid choice: 'sfy' (did you "
             "mean 'sft'?"),
            (["qed-jax", "sft", "--confg", "configs/sft/tiny.yaml"],
             "the job's command does not parse (qed-jax sft: error: unrecognized arguments: --confg (did you mean "
             "--config?); `qed-jax sft --help` shows the usage): `qed-jax sft --confg configs/sft/tiny.yaml`"),
            (["qed-jax", "sft", "--config", "configs/sft/tiny.yml", "--distributed"],
             f"the job's --config configs/sft/tiny.yml is no file of {REPO} that `setup` copies to the workers"),
            (["qed-jax", "sft", "--config=configs/sft", "--distributed"], "the job's --config configs/sft is no file"),
            (["qed-jax", "sft", "--config", "runs/x.yaml"], "the job's --config runs/x.yaml is no file"),  # ignored
            (["qed-jax", "sft", "--config", "gs://b/sft.yaml"], "the job's --config gs://b/sft.yaml is no file")):
        assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--dry-run", "--", *job) == 1
        assert capsys.readouterr().err.startswith(f"tpu.py launch: error: {message}")
    assert calls() == []
    # A trainer on several hosts is one job only with --distributed; on one host it needs none.
    job = ["qed-jax", "grpo", "--config", "configs/rl/tiny.yaml"]
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-16", "--dry-run", "--", *job) == 1
    assert capsys.readouterr().err.strip() == ("tpu.py launch: error: `qed-jax grpo` on the 2 hosts of this slice "
                                               "needs --distributed, which joins their processes into one job: add "
                                               "it after `--`")
    for accelerator, extra in (("v5p-16", ["--distributed"]), ("v5p-8", [])):
        assert launcher("launch", "qr", *WHERE, "--accelerator-type", accelerator, "--dry-run", "--", *job,
                        *extra) == 0
    assert calls() == []
    # A job that parses, with a config the workers get, goes on (here: to print what it would run);
    # with --commit the workers get other code, which this checkout's parser does not speak for.
    for commit, job in (([], ["qed-jax", "sft", "--config=configs/sft/tiny.yaml", "steps=2", "--distributed"]),
                        (["--commit", "HEAD"], ["qed-jax", "sfy"])):
        assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", *commit, "--dry-run", "--", *job) == 0
        assert "queued-resources create qr" in capsys.readouterr().out


def test_a_launch_from_a_commit_that_does_not_exist_requests_no_slice(gcloud, capsys):
    _, calls = gcloud
    for dry_run in ([], ["--dry-run"]):
        assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--commit", "no-such-ref",
                        *dry_run, "--", "true") == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"tpu.py launch: error: --commit 'no-such-ref' is not a commit of {REPO}; give a branch, tag or hash")
    assert calls() == []


def test_a_missing_gcloud_is_one_line(gcloud, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert launcher("status", "qr", *WHERE) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tpu.py status: error: cannot run gcloud (not found on PATH): install the Google Cloud SDK "
        "(cloud.google.com/sdk)")


def test_setup_from_a_commit_uses_git_archive(gcloud, tmp_path):
    write_script, _ = gcloud
    write_script(states=["ACTIVE\tv5p-8"])
    assert launcher("setup", "qr", *WHERE, "--commit", "HEAD") == 0
    committed = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", "HEAD"],
                               check=True, capture_output=True, text=True).stdout.split()
    files = [m.name for m in tarfile.open(tmp_path / "gcloud/copied.tar.gz") if m.isfile()]
    assert sorted(files) == sorted(committed)


def test_a_worker_killed_by_a_signal_exits_as_a_shell_says(gcloud, tmp_path, monkeypatch, capsys):
    """Popen gives -9 for a process killed by SIGKILL; exit(-9) would be 247."""
    class Killed:
        pid = 0

        def poll(self, timeout=None):
            return -9

        wait = poll

    monkeypatch.setattr(tpu.subprocess, "Popen", lambda *args, **kwargs: Killed())
    assert launcher("run", "qr", *WHERE, "--local", "--accelerator-type", "v5p-8", "--log-dir", str(tmp_path), "--",
                    "x") == 137
    assert "worker 0 failed with exit code 137" in capsys.readouterr().err


def test_run_starts_one_ssh_per_worker_and_stops_all_when_one_fails(gcloud, tmp_path):
    write_script, calls = gcloud
    write_script(states=["ACTIVE\tv4-16"],
                 runs={"0": [{"code": 0, "sleep": 60}], "1": [{"code": 3, "wait_for": ["0"]}]})
    code = launcher("run", "qr", *WHERE, "--accelerator-type", "v4-16", "--log-dir", "logs",
                    "--env", "WANDB_MODE=offline", "--", "qed-jax", "sft", "--config", "c.yaml",
                    "--distributed")
    assert code == 3
    assert verbs(calls()) == ["describe", "run", "run"]
    runs = sorted(calls()[1:], key=lambda argv: argv[6])
    for worker, argv in enumerate(runs):
        assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qr", f"--worker={worker}"]
        assert argv[7] == (f"--command=cd ~/qed-jax && QED_WORKER_ID={worker} WANDB_MODE=offline "
                           "bash tpu_scripts/worker_run.sh qed-jax sft --config c.yaml --distributed")
    log0 = (tmp_path / "logs/worker-0.log").read_text()
    assert "worker 0 started" in log0 and "worker 0 done" not in log0  # stopped, not finished
    assert "worker 1 done" in (tmp_path / "logs/worker-1.log").read_text()


def test_launch_recovers_from_preemption_without_using_the_failure_budget(gcloud, tmp_path):
    write_script, calls = gcloud
    write_script(
        states=["MISSING", "ACTIVE", "SUSPENDED",  # created, ran, preempted mid-run
                "SUSPENDED", "PROVISIONING", "ACTIVE"],  # deleted, created again, ran
        runs={"0": [{"code": 255, "wait_for": ["1"]}, {"code": 0}],
              "1": [{"code": 0, "sleep": 60}, {"code": 0}]})
    code = launcher("launch", "qr", *WHERE, "--accelerator-type", "v4-16", "--poll", "0",
                    "--retry-delay", "0", "--max-failures", "1", "--max-preemptions", "2",
                    "--run-id", "r1", "--log-dir", "logs", "--", "qed-jax", "sft",
                    "checkpoint_dir=gs://b/r1", "--distributed")
    assert code == 0
    assert verbs(calls()) == [
        "describe", "create", "describe", "scp", "setup", "run", "run", "describe",
        "describe", "delete", "create", "describe", "describe", "scp", "setup", "run", "run"]
    restarted = [argv[7] for argv in calls()[-2:]]
    assert all("QED_RUN_ID=r1" in c and "checkpoint_dir=gs://b/r1" in c for c in restarted)
    assert "worker 0 done" in (tmp_path / "logs/r1/attempt-2/worker-0.log").read_text()


def test_a_slice_created_again_gets_the_code_the_launch_started_with(gcloud, tmp_path, monkeypatch):
    """A job resumed after a preemption, maybe days later, runs the code it was launched with,
    not edits made to the checkout since."""
    write_script, calls = gcloud
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text("launched")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.setattr(tpu, "REPO", repo)
    real_run = tpu.run

    def edit_then_run(*args, **kwargs):
        (repo / "train.py").write_text("edited since")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tpu, "run", edit_then_run)
    write_script(states=["MISSING", "ACTIVE", "SUSPENDED",  # created, ran, preempted
                         "SUSPENDED", "ACTIVE"],  # deleted, created again, set up, ran
                 runs={"0": [{"code": 255}, {"code": 0}]})
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--retry-delay", "0",
                    "--run-id", "r", "--log-dir", "logs", "--", "true") == 0
    assert verbs(calls()).count("scp") == 2
    assert tarfile.open(tmp_path / "gcloud/copied.tar.gz").extractfile("train.py").read() == b"launched"
    assert not list(tmp_path.glob("qed-jax-qr-*"))  # removed once the launch ends


def test_a_launch_whose_packed_code_was_removed_says_so(gcloud, tmp_path, monkeypatch, capsys):
    """A cleaner of temporary files may remove the launch's tarball in the days before a
    preemption: the slice created again is not set up from nothing, and the error says why."""
    write_script, _ = gcloud
    real_run = tpu.run

    def clean_then_run(*args, **kwargs):
        for tarball in tmp_path.glob("qed-jax-qr-*"):
            tarball.unlink()
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tpu, "run", clean_then_run)
    write_script(states=["MISSING", "ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE", "ACTIVE"],
                 runs={"0": [{"code": 255}]})
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--retry-delay", "0",
                    "--run-id", "r", "--log-dir", "logs", "--", "true") == 1
    assert "is gone (a cleaner of temporary files?): launch again with the same --run-id" in capsys.readouterr().err


def test_a_slice_preempted_while_it_is_set_up_is_created_again(gcloud):
    write_script, calls = gcloud
    write_script(states=["MISSING", "ACTIVE", "SUSPENDED",  # created; the copy fails: preempted
                         "SUSPENDED", "ACTIVE"],  # deleted, created again, set up, ran
                 scp=[255, 0], runs={"0": [{"code": 0}]})
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--retries", "1",
                    "--run-id", "r3", "--log-dir", "logs", "--max-failures", "1", "--", "true") == 0
    assert verbs(calls()) == ["describe", "create", "describe", "scp", "describe",
                              "describe", "delete", "create", "describe", "scp", "setup", "run"]


def test_a_create_or_delete_that_fails_once_does_not_end_a_launch(gcloud):
    """A slice recreated after a preemption, days into a run: one failed create (a 503) is
    retried as describe, scp and ssh are; so is the delete of --delete-at-end. A failure after
    which the slice is there (a create whose reply was lost), or gone (a delete's), is not
    retried: a retry would fail on the slice's existing, or not."""
    write_script, calls = gcloud
    write_script(states=["MISSING", "MISSING", "ACTIVE\tv5p-8", "ACTIVE\tv5p-8"], create=[1, 0], delete=[1, 0],
                 runs={"0": [{"code": 0}]})
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--retry-delay", "0",
                    "--run-id", "r", "--log-dir", "logs", "--delete-at-end", "--", "true") == 0
    assert verbs(calls()) == ["describe", "create", "describe", "create", "describe", "scp", "setup", "run",
                              "delete", "describe", "delete"]
    write_script(states=["MISSING", "CREATING", "ACTIVE\tv5p-8", "MISSING"], create=[1], delete=[1],
                 runs={"0": [{"code": 0}]})
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--retry-delay", "0",
                    "--run-id", "r", "--log-dir", "logs", "--delete-at-end", "--", "true") == 0
    assert verbs(calls())[-9:] == ["describe", "create", "describe", "describe", "scp", "setup", "run", "delete",
                                   "describe"]


def test_launch_stops_after_max_failures(gcloud, capsys):
    write_script, calls = gcloud
    fail = {"code": 1, "wait_for": ["1"]}
    write_script(states=["ACTIVE"] * 6, runs={"0": [fail, fail], "1": [{"code": 0, "sleep": 60}] * 2})
    code = launcher("launch", "qr", *WHERE, "--accelerator-type", "v4-16", "--poll", "0",
                    "--max-failures", "2", "--run-id", "r2", "--log-dir", "logs", "--", "false")
    assert code == 1
    assert "the job failed 2 times (last exit code 1)" in capsys.readouterr().err
    # An existing ACTIVE slice is reused, set up once, and never deleted.
    assert verbs(calls()) == ["describe", "describe", "scp", "setup", "run", "run", "describe",
                              "describe", "describe", "run", "run", "describe"]


def test_launch_dry_run_prints_the_pod_sequence_and_calls_nothing(gcloud, capsys):
    _, calls = gcloud
    code = launcher("launch", "qed-sft", *WHERE, "--accelerator-type", "v5p-64", "--run-id", "r",
                    "--delete-at-end", "--dry-run", "--", "qed-jax", "sft", "--distributed")
    assert code == 0 and calls() == []
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split()[4] for line in lines] == [
        "describe", "create", "describe", "scp", "ssh", *["ssh"] * 8, "delete"]
    assert "[tpu] r: the dry run stops here; a launch repeats the job until it succeeds" in err.splitlines()
    assert "--worker=7" in lines[-2] and "> tpu_logs/r/attempt-1/worker-7.log 2>&1 &" in lines[-2]
    launcher("run", "qed-sft", *WHERE, "--accelerator-type", "v5p-8", "--log-dir", "my logs", "--dry-run", "--",
             "qed-jax", "sft")  # a log folder with a space: the printed line still runs as shown
    assert "> 'my logs/worker-0.log' 2>&1 &" in capsys.readouterr().out


def test_launch_refuses_an_existing_slice_of_another_type(gcloud, capsys):
    """A slice of another size would run the job on the wrong number of workers (8 hosts of a
    v5p-64 waiting for 7 that never start): refused before anything is copied."""
    write_script, calls = gcloud
    write_script(states=["ACTIVE\tv5p-64"])
    code = launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--run-id", "r",
                    "--log-dir", "logs", "--", "true")
    assert code == 1 and verbs(calls()) == ["describe"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tpu.py launch: error: qr exists as a v5p-64 slice, not v5p-8: its workers would not match the job's; "
        "give --accelerator-type v5p-64, or another name")
    write_script(states=["ACTIVE\tv5p-8", "ACTIVE\tv5p-8"], runs={"0": [{"code": 0}]})  # the same type: reused
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--poll", "0", "--run-id", "r",
                    "--log-dir", "logs", "--", "true") == 0


def test_run_refuses_a_slice_of_another_type(gcloud, capsys):
    """`run --accelerator-type v5p-8` on a v5p-64 would start one of its 8 workers, and a
    distributed job would wait for the other 7 forever."""
    write_script, calls = gcloud
    write_script(states=["ACTIVE\tv5p-64"])
    assert launcher("run", "qr", *WHERE, "--accelerator-type", "v5p-8", "--log-dir", "logs", "--", "true") == 1
    assert verbs(calls()) == ["describe"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tpu.py run: error: qr exists as a v5p-64 slice, not v5p-8: its workers would not match the job's; "
        "give --accelerator-type v5p-64, or another name")


@pytest.mark.parametrize("state, says", [("MISSING", "missing"), ("WAITING_FOR_RESOURCES\tv5p-8", "WAITING_FOR_RESOURCES")])
def test_run_on_a_slice_that_is_missing_or_not_ready_is_one_line(gcloud, capsys, state, says):
    """A misspelt name or zone, or a slice still queued, would fail every worker's ssh."""
    write_script, calls = gcloud
    write_script(states=[state])
    assert launcher("run", "qr", *WHERE, "--accelerator-type", "v5p-8", "--log-dir", "logs", "--", "true") == 1
    assert verbs(calls()) == ["describe"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tpu.py run: error: qr is {says} in us-east5-a, not ACTIVE: check the name, --zone and --project, or "
        "`tpu.py wait` for it")


def test_dry_run_given_to_the_job_is_refused_before_any_call(gcloud, capsys):
    """`--dry-run` after `--` would reach the job while the launcher requested a real slice."""
    _, calls = gcloud
    code = launcher("launch", "qr", *WHERE, "--accelerator-type", "v5p-8", "--", "qed-jax", "sft", "--distributed",
                    "--dry-run")
    assert code == 1 and calls() == []
    assert capsys.readouterr().err.strip().endswith("--dry-run after `--` goes to the job, and the launcher would "
                                                    "run for real: put it before `--`")


@pytest.mark.parametrize("verb,extra", [("create", ["--accelerator-type", "v5p-8", "--", "--capacity", "reserved"]),
                                         ("delete", ["--", "--force"]), ("setup", ["--", "--commit", "HEAD"])])
def test_what_follows_dashes_for_a_command_that_runs_no_job_is_refused(gcloud, capsys, verb, extra):
    """Options after `--` of a command that runs no job would be dropped silently (a spot slice
    requested instead of a reserved one, a delete without --force)."""
    _, calls = gcloud
    assert launcher(verb, "qr", *WHERE, *extra) == 1 and calls() == []
    assert "nothing goes after `--`" in capsys.readouterr().err


def test_bad_env_is_one_line_error(gcloud, capsys):
    with pytest.raises(SystemExit) as exit_:
        launcher("run", "qr", *WHERE, "--accelerator-type", "v4-8", "--env", "1X=2", "--", "true")
    assert exit_.value.code == 2  # a usage error, as every other bad argument
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "tpu.py run: error: argument --env: expected KEY=VALUE with KEY a shell variable name, got '1X=2'"


# Each fake worker greets and marks itself started. With FAIL=1 worker 1 exits 7 once all have
# started, and the others would sleep a minute: they must be stopped instead.
JOB = """
import os, pathlib, sys, time
w, fail, sync = int(os.environ["QED_WORKER_ID"]), os.environ["FAIL"] == "1", pathlib.Path(os.environ["SYNC"])
print(os.environ["GREETING"], "from worker", w, flush=True)
(sync / str(w)).touch()
if fail and w == 1:
    while len(list(sync.iterdir())) < 4:
        time.sleep(0.05)
    sys.exit(7)
time.sleep(60 if fail else 0)
print("finished", flush=True)
"""


@pytest.mark.parametrize("fail", [False, True])
def test_run_local_fake_workers(tmp_path, fail):
    """`run --local` runs worker_run.sh as one local process per worker, per-worker logs."""
    logs, sync = tmp_path / "logs", tmp_path / "sync"
    sync.mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "tpu.py"), "run", "qr", "--local", "--accelerator-type",
         "v5litepod-16", "--log-dir", str(logs), "--env", "GREETING=hello", "--env", f"SYNC={sync}",
         "--env", f"FAIL={int(fail)}", "--", "python", "-c", JOB], capture_output=True, text=True)
    assert result.returncode == (7 if fail else 0), result.stderr
    for w in range(4):
        lines = (logs / f"worker-{w}.log").read_text().splitlines()
        assert f"hello from worker {w}" in lines
        assert ("finished" in lines) == (not fail)
    if fail:
        assert "worker 1 failed with exit code 7" in result.stderr


@pytest.mark.parametrize("script", ["worker_setup.sh", "worker_run.sh"])
def test_worker_scripts_parse(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPTS / script)], check=True)


def worker_setup(tmp_path: Path):
    """A `set_up(files, path)` that runs worker_setup.sh on a tarball of `files` (name: text) into
    QED_HOME tmp_path/qed-jax, with QED_VENV's python a stub that logs to tmp_path/pip.log (nothing
    is downloaded); with another PATH, it may fail."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stub = venv / "bin/python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/pip.log\n')
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "QED_HOME": str(tmp_path / "qed-jax"),
           "QED_VENV": str(venv)}

    def set_up(files: dict[str, str], path: str = env["PATH"]) -> subprocess.CompletedProcess:
        with tarfile.open(tmp_path / "code.tar.gz", "w:gz") as tar:
            for name, text in files.items():
                (tmp_path / "file").write_text(text)
                tar.add(tmp_path / "file", arcname=name)
        return subprocess.run(["bash", str(SCRIPTS / "worker_setup.sh"), str(tmp_path / "code.tar.gz")],
                              env={**env, "PATH": path}, check=path == env["PATH"], capture_output=True, text=True)

    return set_up


def failing_mv(tmp_path: Path, pattern: str) -> str:
    """A PATH whose mv fails when its first argument matches `pattern`: worker_setup.sh stopped there."""
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "mv").write_text(f'#!/bin/bash\n[[ "$1" == {pattern} ]] && exit 1\nexec /bin/mv "$@"\n')
    (failing / "mv").chmod(0o755)
    return f"{failing}:/usr/bin:/bin"


def test_worker_setup_installs_from_a_tarball(tmp_path):
    """worker_setup.sh unpacks a tarball into QED_HOME and installs into QED_VENV (pip is a stub,
    so nothing is downloaded). Run again over that copy, it drops what only the older code had
    and keeps what jobs wrote there (they start in QED_HOME, so an eval's runs/ lands in it)."""
    set_up, home = worker_setup(tmp_path), tmp_path / "qed-jax"
    set_up({"pyproject.toml": "", "old_module.py": "", ".ci/run": "", "notes.md": "old"})
    assert "-m pip install --quiet -e .[tpu]" in (tmp_path / "pip.log").read_text()
    (home / "runs/eval").mkdir(parents=True)
    (home / "runs/eval/samples.jsonl").write_text("hours of sampling")
    (home / ".judge_cache.sqlite").write_text("grades")
    (home / "qed_jax.egg-info").mkdir()
    (home / "report.md").write_text("a job's")
    done = set_up({"pyproject.toml": "new", ".ci/run": "", "notes.md": "new", "report.md": "the code's"})
    assert sorted(p.name for p in home.iterdir()) == [
        ".ci", ".judge_cache.sqlite", ".qed-code", "notes.md", "pyproject.toml", "report.md", "report.md.kept", "runs"]
    assert (home / "runs/eval/samples.jsonl").read_text() == "hours of sampling"
    assert (home / ".judge_cache.sqlite").read_text() == "grades"
    assert (home / "notes.md").read_text() == "new" and (home / "report.md").read_text() == "the code's"
    assert (home / "report.md.kept").read_text() == "a job's"
    assert f"the one a job wrote is at {home}/report.md.kept" in done.stderr

    # Stopped half-way (here an mv that fails on one file of the new code), then run again: what
    # jobs wrote never left QED_HOME, and the second run ends as one whole run would.
    code = {"pyproject.toml": "newer", ".ci/run": "", "aa_first": "", "zz_last": ""}
    assert set_up(code, failing_mv(tmp_path, "*/zz_last")).returncode != 0
    assert (home / "runs/eval/samples.jsonl").read_text() == "hours of sampling"
    set_up(code)
    assert sorted(p.name for p in home.iterdir()) == [
        ".ci", ".judge_cache.sqlite", ".qed-code", "aa_first", "pyproject.toml", "report.md.kept", "runs", "zz_last"]
    assert (home / "pyproject.toml").read_text() == "newer" and not (tmp_path / "qed-jax.new").exists()


def test_worker_setup_run_again_after_a_stop_keeps_what_a_job_wrote(tmp_path):
    """A rerun after a stop (tpu.py retries a dropped ssh) must not count a job's entry that the
    new code also has as code: it is kept before .qed-code names it. One kept before is not
    nested into: the next kept copy is numbered."""
    set_up, home = worker_setup(tmp_path), tmp_path / "qed-jax"
    set_up({"pyproject.toml": ""})
    (home / "report.md").write_text("a job's")
    (home / "out.kept").mkdir()
    (home / "out.kept/older.txt").write_text("an earlier job's")
    (home / "out").mkdir()
    (home / "out/newer.txt").write_text("a later job's")
    code = {"pyproject.toml": "", "report.md": "the code's", "out/run.py": ""}
    assert set_up(code, failing_mv(tmp_path, "*/report.md")).returncode != 0  # stopped as it keeps report.md
    set_up(code)
    assert (home / "report.md.kept").read_text() == "a job's" and (home / "report.md").read_text() == "the code's"
    assert (home / "out.kept/older.txt").read_text() == "an earlier job's"
    assert (home / "out.kept.2/newer.txt").read_text() == "a later job's"
    assert sorted(p.name for p in home.iterdir()) == [
        ".qed-code", "out", "out.kept", "out.kept.2", "pyproject.toml", "report.md", "report.md.kept"]


def test_worker_setup_fetches_python_with_uv_when_venv_fails(tmp_path):
    """Ubuntu's python3.11 without python3.11-venv cannot make a virtual environment (it leaves
    one without pip): the script falls back to uv instead of stopping, and so does a rerun over
    such a half-made one. Stand-ins for python3.11, pip, uv and the virtual environment's python
    log what ran."""
    tools, stubs = tmp_path / "bin", tmp_path / "stubs"
    tools.mkdir()
    stubs.mkdir()
    for tool in ("tar", "gzip", "mkdir", "rm", "mv", "cp", "chmod"):
        (tools / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"

    def stand_in(path: Path, name: str, then: str = ""):
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{then}\n')
        path.chmod(0o755)

    half_made = 'mkdir -p "$3/bin" && printf "#!/bin/sh\\nexit 1\\n" > "$3/bin/python" && chmod +x "$3/bin/python"'
    stand_in(tools / "python3.11", "python3.11", half_made + '; echo "ensurepip is not available" >&2; exit 1')
    stand_in(stubs / "python", "venv")
    stand_in(stubs / "uv", "uv", f'mkdir -p "$5/bin" && cp {stubs}/python "$5/bin/python"')  # venv --seed --python 3.11 V
    stand_in(tools / "python3", "python3", f"mkdir -p {tmp_path}/.local/bin && cp {stubs}/uv {tmp_path}/.local/bin/uv")
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text("")
    with tarfile.open(tmp_path / "code.tar.gz", "w:gz") as tar:
        tar.add(src / "pyproject.toml", arcname="pyproject.toml")
    env = {"PATH": str(tools), "HOME": str(tmp_path), "QED_HOME": str(tmp_path / "qed-jax"),
           "QED_VENV": str(tmp_path / "venv")}
    done = subprocess.run([shutil.which("bash"), str(SCRIPTS / "worker_setup.sh"), str(tmp_path / "code.tar.gz")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "python3.11 could not make a virtual environment; fetching Python 3.11 with uv" in done.stdout
    calls = log.read_text().splitlines()
    assert calls[:3] == [f"python3.11 -m venv {tmp_path}/venv", "python3 -m pip install --user --quiet uv",
                         f"uv venv --seed --python 3.11 {tmp_path}/venv"]
    assert "venv -m pip install --quiet -e .[tpu]" in calls
    # A rerun over the half-made environment the old script stopped at makes it again.
    log.unlink()
    (tmp_path / "venv").rename(tmp_path / "good-venv")
    subprocess.run([f"{tmp_path}/bin/python3.11", "-m", "venv", f"{tmp_path}/venv"], env=env)
    done = subprocess.run([shutil.which("bash"), str(SCRIPTS / "worker_setup.sh"), str(tmp_path / "code.tar.gz")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines()[1:4] == calls[:3]  # after the stand-in's own call above


@pytest.mark.tpu_compile  # runs where the tpu extra is installed, as on the workers
def test_the_tpu_extra_gives_gs_paths_a_filesystem():
    """Orbax reaches checkpoint_dir=gs://... through etils, which needs gcsfs for Google Storage."""
    import fsspec
    import gcsfs
    from etils import epath

    assert isinstance(fsspec.filesystem("gs", token="anon"), gcsfs.GCSFileSystem)
    assert str(epath.Path("gs://bucket/run/checkpoints") / "10") == "gs://bucket/run/checkpoints/10"


def test_a_relaunch_with_the_same_run_id_keeps_the_earlier_logs(gcloud, tmp_path, capsys):
    write_script, _ = gcloud
    earlier = tmp_path / "logs/r3/attempt-1"
    earlier.mkdir(parents=True)
    (earlier / "worker-0.log").write_text("the first launch's log\n")
    fail = {"code": 1, "wait_for": ["1"]}
    write_script(states=["ACTIVE"] * 4, runs={"0": [fail], "1": [{"code": 0, "sleep": 60}]})
    assert launcher("launch", "qr", *WHERE, "--accelerator-type", "v4-16", "--poll", "0", "--max-failures", "1",
                    "--run-id", "r3", "--log-dir", "logs", "--", "false") == 1
    assert (earlier / "worker-0.log").read_text() == "the first launch's log\n"
    assert (tmp_path / "logs/r3/attempt-2/worker-0.log").exists()
    assert "the job failed 1 times" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--poll", "-5", "must be 0 or more, got -5"), ("--retries", "0", "must be more than 0, got 0"),
    ("--retry-delay", "-1", "must be 0 or more, got -1"), ("--max-failures", "0", "must be more than 0, got 0"),
    ("--max-preemptions", "-1", "must be more than 0, got -1"), ("--retries", "two", "invalid int value: 'two'")])
def test_bad_numbers_are_usage_errors(gcloud, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        launcher("launch", "qr", *WHERE, "--accelerator-type", "v4-8", flag, value, "--dry-run", "--", "true")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tpu.py launch: error: argument {flag}: {message}"


def test_a_launcher_started_with_nohup_outlives_its_terminal(tmp_path):
    """`nohup tpu.py launch ... &` ignores SIGHUP on purpose: a closed terminal must not stop a
    launch that babysits its job for hours (SIGTERM still stops the workers)."""
    import os
    import signal
    import time
    marker = f"sleep 7{os.getpid() % 1000}"
    # nohup itself (a preexec_fn would fork this multithreaded JAX process: a possible deadlock)
    proc = subprocess.Popen(["nohup", sys.executable, str(SCRIPTS / "tpu.py"), "run", "qr", "--local",
                             "--accelerator-type", "v5p-16", "--log-dir", str(tmp_path / "logs"), "--",
                             *marker.split()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(running(marker)) == 2)  # both workers' jobs started
        time.sleep(1)  # and the launcher past starting them
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert proc.poll() is None and len(running(marker)) == 2  # still running
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        wait_until(lambda: not running(marker))
        assert code == 130 and running(marker) == []
    finally:
        for pid in running(marker):
            os.kill(int(pid), signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
