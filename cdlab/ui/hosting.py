"""Hosting policy: public and classroom hosts, the training gate, who may do what, what is served, ``spaces.GPU``.

A host is *shared* when people other than the one who started the app reach it. A *classroom* is a shared host
that is not public: ``--host`` anything but loopback (``0.0.0.0``, a LAN address; or ``CDLAB_CLASSROOM=1``).
There training, resuming, stopping a run without an owner and new evaluations belong to the instructor, who
proves it with a token printed in the terminal at start (or ``--instructor-token``): `Policy`, `host_policy`.

A host is *public* on Hugging Face Spaces (``SPACE_ID`` is set) and behind a ``--share`` link. There:

- training is off unless ``CDLAB_ALLOW_TRAINING=1`` (or ``python app.py --allow-training``);
- a new evaluation is capped at `PUBLIC_EVAL_MAX_PROMPTS` prompts, so it cannot hold the GPU queue
  for minutes while others wait.

Everywhere, a run started from the app can be stopped or resumed only from the browser session that
started it, or in a classroom by the instructor (the local CLI aside: ``kill -TERM`` or
``python -m cdlab train --resume``); a student it published is replaced only from that session too; and the app
serves previews, metrics, plots and cards, never files from ``runs/`` or the latent cache (no
checkpoints, no optimiser states): `blocked_paths`.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cdlab.train.config import APP_LIMITS

# One queue for everything that touches the GPU, so Compare, Evaluate and previews never overlap.
GPU_CONCURRENCY_ID = "gpu"
GPU_CONCURRENCY_LIMIT = 1
QUEUE_MAX_SIZE = 64
# Compare requests all enter the function at once and wait in cdlab's micro-batcher, which serves
# the ones waiting together (one batched UNet call per column); the teacher's lock keeps them and
# Evaluate apart.
COMPARE_CONCURRENCY_ID = "compare"
COMPARE_CONCURRENCY_LIMIT = 48
DEFAULT_CONCURRENCY_LIMIT = 2
MAX_FILE_SIZE = "20mb"
TRAINING_ENV = "CDLAB_ALLOW_TRAINING"

TRAINING_OFF_MESSAGE = (
    "Training is disabled on this public host (a Space or a --share link). Training needs dedicated GPU "
    "hardware for its whole run (ZeroGPU calls are capped at minutes) and is a powerful action; set "
    f"{TRAINING_ENV}=1 (or start the app with --allow-training) to enable it, or run `python app.py` locally."
)


PUBLIC_EVAL_MAX_PROMPTS = 32     # a new evaluation on a public host: at most this many prompts
LOCAL_EVAL_MAX_PROMPTS = 1024
LOCAL_EVAL_DEFAULT_PROMPTS = 128  # `cdlab.evaluate`'s own default on the tiny world


def is_public_host(share: bool = False) -> bool:
    """True on Hugging Face Spaces (the ``SPACE_ID`` variable is set there) or behind a ``--share`` link."""
    return bool(os.environ.get("SPACE_ID")) or bool(share)


def training_allowed(share: bool = False) -> bool:
    """Training is on locally; on a public host (a Space, a ``--share`` link) only when ``CDLAB_ALLOW_TRAINING=1``."""
    if not is_public_host(share):
        return True
    return os.environ.get(TRAINING_ENV, "").strip().lower() in ("1", "true", "yes")


def eval_prompt_limits(share: bool = False) -> tuple[int, int]:
    """``(default, maximum)`` prompts of a new evaluation started from the app on this host."""
    if is_public_host(share):
        return PUBLIC_EVAL_MAX_PROMPTS, PUBLIC_EVAL_MAX_PROMPTS
    return LOCAL_EVAL_DEFAULT_PROMPTS, LOCAL_EVAL_MAX_PROMPTS


def gpu(fn: Callable | None = None, *, duration: int = 60) -> Any:
    """Wrap ``fn`` with ``spaces.GPU(duration=...)`` when the ``spaces`` package is importable.

    Usable bare (``@gpu``) or with arguments (``@gpu(duration=120)``); without ``spaces`` it
    returns ``fn`` unchanged.
    """
    def wrap(f: Callable) -> Callable:
        try:
            import spaces  # type: ignore[import-not-found]
        except ImportError:
            return f
        return spaces.GPU(duration=duration)(f)

    return wrap(fn) if fn is not None else wrap


def batching_allowed() -> bool:
    """Whether Compare may batch concurrent requests on a worker thread: not under ZeroGPU (``spaces``
    importable), where the GPU exists only inside each decorated call."""
    try:
        import spaces  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return True
    return False


def blocked_paths(runs_dir: Path, cache_dir: Path | None = None) -> list[str]:
    """Folders the app never serves, even a file an event returned: run folders (checkpoints, optimiser
    states, logs) and the latent cache. Previews leave ``runs/`` as images the app returns, copied by
    Gradio into its own cache, so only what the app chose to show is ever served."""
    paths = [Path(runs_dir)]
    if cache_dir is not None:
        paths.append(Path(cache_dir))
    return [str(p.resolve()) for p in paths]




# Gradio's cache (the result images, the Compare PNG, uploads) is emptied of files older than `age` seconds
# every `frequency` seconds: ``gr.Blocks(delete_cache=delete_cache())``. Tests shorten it by the variable.
DELETE_CACHE = (300, 900)
DELETE_CACHE_ENV = "CDLAB_DELETE_CACHE"


def delete_cache() -> tuple[int, int]:
    """``(frequency, age)`` in seconds for Gradio's ``delete_cache``: `DELETE_CACHE`, or ``$CDLAB_DELETE_CACHE``
    (two whole numbers >= 1, ``"frequency,age"``)."""
    raw = os.environ.get(DELETE_CACHE_ENV, "").strip()
    if not raw:
        return DELETE_CACHE
    parts = raw.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{DELETE_CACHE_ENV} must be two whole numbers >= 1, 'frequency,age' in seconds; got {raw!r}")
    return int(parts[0]), int(parts[1])


class _SnapshotSet(set):
    """A set whose iteration walks a copy (taken atomically): Gradio's ``delete_cache`` walks each component's files
    on a worker thread while requests add new ones, and a live set then raises "Set changed size during iteration",
    which ends its schedule for good (gradio 6.31): under load nothing was deleted any more."""

    def __iter__(self):
        return iter(set.copy(self))


def safe_delete_cache(demo: Any) -> Any:
    """Make ``demo``'s ``delete_cache`` survive concurrent requests: every file set it walks (each component's, the
    uploads') becomes a `_SnapshotSet`. Call it once the page is built; returns ``demo``."""
    for block in demo.blocks.values():
        if isinstance(getattr(block, "temp_files", None), set):
            block.temp_files = _SnapshotSet(block.temp_files)
    demo.upload_file_set = _SnapshotSet(demo.upload_file_set)
    demo.temp_file_sets = [demo.upload_file_set] + [b.temp_files for b in demo.blocks.values()
                                                    if isinstance(getattr(b, "temp_files", None), _SnapshotSet)]
    return demo


# ----------------------------------------------------------------------------- the classroom: one instructor

CLASSROOM_ENV = "CDLAB_CLASSROOM"              # =1: a shared host whatever --host says (behind a proxy, tests)
INSTRUCTOR_ENV = "CDLAB_INSTRUCTOR_TOKEN"      # the instructor token, instead of --instructor-token
SECRET_NAME = ".app-secret"                    # runs/.app-secret: the fixed key of the browser's stored tokens
SHARED_MAX_STEPS = int(APP_LIMITS["max_steps"][1])  # a run from the app: at most this many steps (everywhere) ...
SHARED_MAX_SECONDS = 4 * 3600.0                # ... and this long (then it is stopped at a checkpoint)
MAX_SECONDS_ENV = "CDLAB_SHARED_MAX_SECONDS"   # overrides SHARED_MAX_SECONDS (tests, a longer lab)


class HostRuleError(ValueError):
    """A request this host's policy refuses; the message names the rule."""


def is_loopback(host: str | None) -> bool:
    """Whether ``--host`` serves this machine only: ``127.0.0.0/8``, ``::1`` or ``localhost`` (None: Gradio's
    default, 127.0.0.1). Anything else (``0.0.0.0``, ``::``, a LAN address, a host name) reaches other people."""
    if host is None:
        return True
    name = str(host).strip().strip("[]").lower()
    if name in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _max_seconds() -> float:
    try:
        value = float(os.environ.get(MAX_SECONDS_ENV, SHARED_MAX_SECONDS))
    except ValueError:
        return SHARED_MAX_SECONDS
    return value if math.isfinite(value) and value > 0 else SHARED_MAX_SECONDS


@dataclass(frozen=True)
class Policy:
    """Who may do what on this host (`host_policy` builds it from the command line).

    - a *public* host (a Space, a ``--share`` link): today's rules (`training_allowed`, `eval_prompt_limits`);
    - a *classroom* (``--host`` not loopback, or ``CDLAB_CLASSROOM=1``; not public): training, resuming,
      stopping a run without an owner and new evaluations belong to the instructor, who proves it with the
      token printed in the terminal at start (``instructor`` holds its SHA-256, never the token);
    - on either shared kind a run is capped at ``max_steps`` steps and ``max_seconds`` of wall-clock time;
    - loopback: everything allowed, no caps.
    """

    public: bool = False
    classroom: bool = False
    instructor: str | None = None
    max_steps: int | None = None
    max_seconds: float | None = None

    @property
    def shared(self) -> bool:
        return self.public or self.classroom

    def training_allowed(self) -> bool:
        """Whether this host trains at all (a public host only with ``CDLAB_ALLOW_TRAINING=1``)."""
        return training_allowed(self.public)

    def eval_prompt_limits(self) -> tuple[int, int]:
        return eval_prompt_limits(self.public)

    def is_instructor(self, token: Any) -> bool:
        """Whether ``token`` is the instructor's (compared in constant time); False where there is no instructor."""
        if not self.instructor or not isinstance(token, str) or not token:
            return False
        digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        return hmac.compare_digest(digest, self.instructor)

    def require_instructor(self, token: Any, action: str) -> None:
        """In a classroom, refuse ``action`` (e.g. "Training") unless ``token`` is the instructor's."""
        if self.classroom and not self.is_instructor(token):
            raise HostRuleError(f"{action} on a shared host belongs to the instructor: give the instructor token "
                                "printed in the app's terminal (the 'Instructor token' box, or the API's "
                                "instructor_token). Everyone may Compare, Edit and watch runs.")

    def rules_line(self) -> str:
        """What the Train and Evaluate tabs say about who may do what here ('' on a loopback host)."""
        if self.classroom:
            return ("**Shared host (classroom):** training, resuming and stopping runs and new evaluations belong to "
                    "the instructor (the token printed in the app's terminal). Everyone may Compare, Edit and "
                    f"watch runs. A run is capped at {self.max_steps} steps and "
                    f"{self.max_seconds / 60:g} minutes.")
        if self.public:
            return (f"**Public host:** runs are capped at {self.max_steps} steps and {self.max_seconds / 60:g} "
                    "minutes; only the browser that started a run may stop it.")
        return ""


def host_policy(host: str | None, share: bool = False, classroom: bool = False,
                instructor_token: str | None = None) -> tuple[Policy, str | None]:
    """This host's `Policy` and the instructor token (None off a classroom): ``instructor_token`` (the
    ``--instructor-token`` flag), else ``$CDLAB_INSTRUCTOR_TOKEN``, else a fresh one from `secrets`, for the
    terminal to print. A classroom is a ``host`` that is not loopback, or ``classroom`` / ``CDLAB_CLASSROOM=1``."""
    public = is_public_host(share)
    classroom = not public and (bool(classroom) or os.environ.get(CLASSROOM_ENV, "").strip() in ("1", "true", "yes")
                                or not is_loopback(host))
    if not (public or classroom):
        return Policy(), None
    token = None
    if classroom:
        token = instructor_token or os.environ.get(INSTRUCTOR_ENV) or secrets.token_urlsafe(18)
    digest = hashlib.sha256(token.encode()).hexdigest() if token else None
    return Policy(public, classroom, digest, SHARED_MAX_STEPS, _max_seconds()), token


def app_secret(runs_dir: Path) -> str:
    """The app's fixed secret, ``runs/.app-secret`` (mode 0600, made once, atomically): the key Gradio encrypts
    the browser's stored tokens with (``gr.BrowserState(secret=...)``), so an owner token still opens its runs
    after the app restarts (a per-launch key would make every stored token unreadable). Gradio gives this key to
    the page, which does the encryption: it is not a credential; the owner token is, and the server keeps only
    its SHA-256. Two apps starting at once agree on one secret (the first link wins)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / SECRET_NAME
    for _ in range(3):
        try:
            value = path.read_text().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        tmp = runs_dir / f".app-secret.tmp{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process made it first: then theirs is read
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError(f"cannot read or create {path}")


def instructor_token_box(policy: Policy, elem_id: str) -> Any:
    """The Train and Evaluate tabs' "Instructor token" box (a password field, shown in a classroom only; the
    API's ``instructor_token`` everywhere, so the endpoints are the same on every host)."""
    import gradio as gr

    return gr.Textbox("", type="password", label="Instructor token", visible=policy.classroom, elem_id=elem_id,
                      info="printed in the app's terminal at start; kept in this browser")


def keep_instructor_token(demo: Any, state: Any, boxes: list[Any]) -> None:
    """Keep the instructor token in this browser (``state``, a ``gr.BrowserState``): typed into any box, it
    fills the others and is stored; every page load fills the boxes from it."""
    for box in boxes:
        others = [b for b in boxes if b is not box]  # not the box being typed in: its cursor stays put
        box.input(lambda t, n=len(others): (t, *([t] * n)), box, [state, *others], api_visibility="private",
                  trigger_mode="always_last")  # per keystroke: the last value wins, never a stale prefix
    demo.load(lambda t: tuple([t] * len(boxes)), state, boxes, api_visibility="private")


# How often Gradio's queue looks for work while it has none, in seconds: for a new event, and for progress to
# send. Gradio polls every 1 ms and 10 ms off Windows (50 and 100 ms on it): an app nobody uses then costs about
# 5% of a core (measured: 1.6 s of CPU in 30 s), on a laptop on a projector, on a Space, and for every app a test
# suite keeps open. 10 ms adds at most that before a request starts (a Compare takes hundreds); progress bars
# move every 50 ms.
IDLE_POLL_S = 0.01
PROGRESS_POLL_S = 0.05


def quiet_idle_queue(demo: Any, poll_s: float = IDLE_POLL_S, progress_s: float = PROGRESS_POLL_S) -> bool:
    """Make ``demo``'s idle queue poll every ``poll_s`` for events and every ``progress_s`` for progress, in place
    of Gradio's 1 and 10 ms (never faster than Gradio's own values).

    Gradio has no option for this: they are its queue's ``sleep_when_free`` and
    ``progress_update_sleep_when_free`` attributes. Where a Gradio version lacks them, nothing changes; returns
    whether both were set."""
    queue = getattr(demo, "_queue", None)
    names = {"sleep_when_free": poll_s, "progress_update_sleep_when_free": progress_s}
    if queue is None or not all(isinstance(getattr(queue, n, None), (int, float)) for n in names):
        return False
    for name, seconds in names.items():
        setattr(queue, name, max(float(getattr(queue, name)), float(seconds)))
    return True


def serve_until_interrupted(demo: Any, **launch_kwargs: Any) -> None:
    """``demo.launch(**launch_kwargs)``, then block until Ctrl-C (or a SIGTERM the caller turns into one), then
    close the server at once.

    Gradio's own blocking loop closes only the server, joining its thread for up to 5 s while uvicorn waits for
    every open connection: each open browser tab holds an event stream that never ends, so every stop of the
    app took those 5 s. Here ``demo.close()`` closes the queue and sets the app's stop event first, which ends
    the event streams, so the server's connections close and it exits at once (1.8 s, not 6.6 s, with one client
    connected); a ``--share`` link's tunnel is killed as Gradio's loop kills it.
    """
    import time

    demo.launch(prevent_thread_lock=True, **launch_kwargs)
    quiet_idle_queue(demo)
    try:
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("cdlab app: interrupted, closing the server", flush=True)
    finally:
        demo.close(verbose=False)
        from gradio.tunneling import CURRENT_TUNNELS  # a --share link's tunnel process

        for tunnel in CURRENT_TUNNELS:
            tunnel.kill()
