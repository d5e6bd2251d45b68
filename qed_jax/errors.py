"""The errors a user can cause and fix. The CLI prints each as one line (no traceback), so this
module stays free of heavy imports: `qed-jax --help` must not wait for JAX or transformers."""

import contextlib


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file and tensor."""


class JudgeUnavailable(RuntimeError):
    """The judge cannot grade (unreachable, or failing on too many items): grading stops rather
    than scoring zeros."""


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


@contextlib.contextmanager
def noted(error: type[Exception], note: str):
    """Re-raise an `error` raised inside with `note` after its message (still one line)."""
    try:
        yield
    except error as e:
        raise error(f"{e} ({note})") from None


class RunConfigChanged(ConfigError):
    """A rerun's config (or training data) differs from what its run directory was started with."""

    def __init__(self, out, changes: list[str], setting: str = "output_dir"):
        """`out`: the folder that holds the run, which `setting` names (output_dir, or
        checkpoint_dir for what a checkpoint recorded)."""
        self.out, self.changes = out, changes
        self.refusal = f"{out} holds a run that differs from this one ({'; '.join(changes)})"
        other = "a new output_dir" if setting == "output_dir" else \
            "a new checkpoint_dir (or output_dir, under which checkpoints/ is the default)"
        super().__init__(f"{self.refusal}; pass --resume-with-changes to continue it as this run is set up, or use "
                         f"{other}")
