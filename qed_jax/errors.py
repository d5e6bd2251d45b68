"""The errors a user can cause and fix. The CLI prints each as one line (no traceback), so this
module stays free of heavy imports: `qed-jax --help` must not wait for JAX or transformers."""

import contextlib
import errno
import os
from pathlib import Path


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file and tensor."""


class JudgeUnavailable(RuntimeError):
    """The judge cannot grade (unreachable, or failing on too many items): grading stops rather
    than scoring zeros."""


class StorageUnreachable(RuntimeError):
    """A bucket path (gs://...) that the storage client cannot reach: the network or the
    credentials, not a path to fix."""


class TrainingDiverged(RuntimeError):
    """A training step whose loss or gradient norm is not finite; the message names the step and
    the checkpoint the run can resume from."""


class DeviceCallInterrupted(KeyboardInterrupt):
    """Ctrl-C while a device call (a decode loop) was still running. The call cannot be
    cancelled, and a normal interpreter exit waits for it to end, so the CLI exits at once
    (`os._exit`) once the command's own cleanup has run. In a process that goes on (a notebook),
    the abandoned call keeps its memory (the KV cache it was given) until it ends, and the next
    device call waits for it."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def json_error(error, line: bool = False) -> str:
    """Why and where JSON text did not parse (a json.JSONDecodeError): "Expecting value at
    column 9", "Unterminated string starting at line 2 column 4"."""
    where = f"line {error.lineno} column {error.colno}" if line else f"column {error.colno}"
    return f"{error.msg} {where}" if error.msg.endswith(" at") else f"{error.msg} at {where}"


def os_error_line(e: OSError) -> str:
    """One line for an OSError: for a failed file operation the path, what went wrong and, for
    the usual mistakes, what to change; else its type and message."""
    if e.filename is None:
        return f"{type(e).__name__}: {e}"

    def name(f) -> str:  # a path, or a file descriptor's number
        return os.fsdecode(f) if isinstance(f, (str, bytes, os.PathLike)) else str(f)

    path = name(e.filename)
    if e.errno == errno.ENOTDIR or (e.errno == errno.EEXIST and os.path.isfile(path)):
        first_file = next((q for q in [path, *map(str, Path(path).parents)] if os.path.isfile(q)), path)
        where = "" if first_file == path else f"{path}: "
        return f"{where}{first_file} is a file where a folder is needed; choose another path"
    if e.errno in (errno.EEXIST, errno.ENOENT):  # mkdir on a link whose folder is not there, or in it
        link = next((q for q in [path, *map(str, Path(path).parents)] if os.path.islink(q) and not os.path.exists(q)),
                    None)
        if link is not None:
            where = "" if link == path else f"{path}: "
            return (f"{where}{link} is a link to {os.readlink(link)}, which does not exist (a disk not mounted?); "
                    "make that folder, or choose another path")
    also = f" (and {name(e.filename2)})" if e.filename2 is not None else ""
    advice = {errno.EROFS: "; choose a path on a writable disk",
              errno.EACCES: "; choose another path, or change its permissions",
              errno.ENOSPC: "; free space on that disk, or choose a path on another",
              errno.EDQUOT: "; free space in your quota, or choose a path on another disk"}.get(e.errno, "")
    return f"{path}{also}: {e.strerror or e}{advice}"


def setting_path_error(key: str, e: OSError) -> ConfigError:
    """A path that the setting `key` names and that could not be made or opened, as one line."""
    return ConfigError(f"{key}: {os_error_line(e)}")


def quoted(text, limit: int = 200) -> str:
    """Another program's text (a server's reply or error) for one line of ours: each run of
    whitespace, line breaks included, as one space, cut to `limit` characters and then marked
    " [...]", so that a cut (in a path, say) does not read as the end."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + " [...]"


def causes(error: BaseException | None):
    """`error`, then what it was raised from, and so on."""
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def out_of_device_memory(error: BaseException | None) -> bool:
    """Whether XLA could not allocate device memory (a model or batch too large for the
    devices), in `error` or what it was raised from. Told by the error's name, so that the CLI
    does not import JAX before a command needs it, and not by RESOURCE_EXHAUSTED alone, which
    storage also answers (a quota)."""
    return any(type(cause).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(cause)
               for cause in causes(error))


def lost_process(error: BaseException | None) -> str | None:
    """The first line of what, in `error` or what it was raised from, says that another process
    of a multi-process job is gone (killed, its host preempted): JAX's coordination service
    after the process stopped sending heartbeats, or the CPU collectives' (Gloo) broken
    connection to it. None when nothing does (a judge's broken connection is to a server, not to
    a process of the job)."""
    for cause in causes(error):
        text = str(cause)
        if any(sign in text for sign in ("heartbeat timeout", "stopped sending heartbeats", "task is set to ERROR")) \
                or ("Gloo" in text and any(sign in text for sign in ("by peer", "Socket closed", "Broken pipe"))):
            return quoted(first_line(cause), 300)
    return None


@contextlib.contextmanager
def noted(error: type[Exception], note: str):
    """Re-raise an `error` raised inside with `note` after its message (still one line)."""
    try:
        yield
    except error as e:
        raise error(f"{e} ({note})") from None


@contextlib.contextmanager
def renamed(error: type[Exception], names: dict[str, str]):
    """Re-raise an `error` raised inside with each key of `names` in its message replaced by its
    value: a library's names for its settings (`RCParams.summary_tokens`) as a caller's config or
    flags spell them."""
    try:
        yield
    except error as e:
        message = str(e)
        for old, new in names.items():
            message = message.replace(old, new)
        raise error(message) from None


class RunConfigChanged(ConfigError):
    """A rerun's config (or training data) differs from what its run directory was started with."""

    def __init__(self, out, changes: list[str], setting: str = "output_dir"):
        """`out`: the folder that holds the run, which `setting` names (output_dir, or
        checkpoint_dir for what a checkpoint recorded)."""
        self.out, self.changes, self.setting = out, changes, setting
        self.refusal = f"{out} holds a run that differs from this one ({'; '.join(changes)})"
        other = "a new output_dir" if setting == "output_dir" else \
            "a new checkpoint_dir (or output_dir, under which checkpoints/ is the default)"
        super().__init__(f"{self.refusal}; pass --resume-with-changes to continue it as this run is set up, or use "
                         f"{other}")
