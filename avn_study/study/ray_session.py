"""The driver's Ray session: joining a cluster (or starting a local Ray), and the settings a stage runs under.

:func:`init_ray` joins ``--address`` (waiting at most :func:`connect_timeout`, refusing a cluster that
rejects this client's token at once) or starts a fresh local Ray (after :func:`check_ray_tmpdir`).
:func:`tune_log` sends Ray Tune's own log records to ``STUDY/driver.log``; :func:`epochs_without_metric`
lets trials report epochs that carry no metric. Nothing here knows about the protocol or the study folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from avn_study.errors import AvnError, UsageError
from avn_study.study.folder import DRIVER_LOG


@contextlib.contextmanager
def epochs_without_metric():
    """Let trials report epochs that carry no ``metric``: a run evaluates only every ``eval_every`` epochs
    (and always at its last), an nnU-Net trial is scored by our metrics only at its end. Ray Tune refuses
    such a result unless its strict check is off; ASHA and the searchers skip it (ASHA's rungs are
    evaluated epochs, :func:`avn_study.study.space.load_space` checks)."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@contextlib.contextmanager
def tune_log(root: Path):
    """Ray Tune's own log records (errored trials' tracebacks, retries) go to ``ROOT/driver.log``, not
    the terminal: the live view and the errored-trial summary say what happened and where to look."""
    import logging

    class _QuietFileHandler(logging.FileHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            pass  # a full or read-only storage: the sweep names that itself, the log must not shout it

    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    try:
        handler: logging.Handler = _QuietFileHandler(root / DRIVER_LOG, delay=True)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = [(lg.propagate, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    try:
        yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


CONNECT_TIMEOUT_ENV = "AVN_STUDY_CONNECT_TIMEOUT"  # seconds a sweep waits for --address (default 30)
DEFAULT_CONNECT_TIMEOUT_S = 30.0
MIN_TMP_FREE_BYTES = 100 * 2**20  # a local Ray's session folder (sockets, logs, the GCS's files) needs room
AUTH_VARIABLES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def connect_timeout(seconds: float | None = None) -> float:
    """How long to wait for a cluster: ``seconds`` (``--connect-timeout``), else ``$AVN_STUDY_CONNECT_TIMEOUT``,
    else 30 s.

    Raises:
        UsageError: the variable is not a positive number of seconds.
    """
    if seconds is not None:
        return float(seconds)
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value < float("inf")):
        raise UsageError(f"{CONNECT_TIMEOUT_ENV}={text!r}: expected a positive number of seconds, e.g. 30")
    return value


def check_ray_tmpdir(min_free: int = MIN_TMP_FREE_BYTES) -> None:
    """The folder a local Ray puts its session in (``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``) must
    take a new folder and have ``min_free`` bytes free; Ray itself would time out after 45 s waiting for
    its GCS ("timed out waiting for gcs_server_port") and leave a traceback.

    Raises:
        UsageError: naming the folder, what is wrong, and the variable that moves it.
    """
    import tempfile

    variable = "RAY_TMPDIR" if "RAY_TMPDIR" in os.environ else "TMPDIR" if "TMPDIR" in os.environ else None
    folder = Path(os.environ[variable]) if variable else Path("/tmp")
    where = f"{variable}={folder}" if variable else f"{folder} (Ray's default temporary folder)"
    hint = "set RAY_TMPDIR (or TMPDIR) to a writable folder with at least " \
           f"{min_free // 2**20} MB free"  # fmt: skip
    if not folder.is_dir():
        raise UsageError(f"{where}: is not a folder (missing, or a file on its path); {hint}")
    try:
        Path(tempfile.mkdtemp(prefix=".avn-study-probe-", dir=folder)).rmdir()  # where Ray would make ray/
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise UsageError(f"{where}: a local Ray cannot make its session folder there ({err.strerror or err}); "
                         f"{hint}") from None  # fmt: skip
    if free < min_free:
        raise UsageError(f"{where}: only {free / 2**20:.0f} MB free, a local Ray needs at least "
                         f"{min_free // 2**20} MB for its session folder; {hint}")  # fmt: skip


def _raise_on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM while waiting for the cluster stops the wait, as Ctrl-C does


def _is_auth_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is Ray's token-authentication refusal."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = f"{type(cur).__name__}: {cur}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text or "Unauthenticated" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _reach(address: str, timeout_s: float) -> str:
    """Wait (at most ``timeout_s``) until the cluster's GCS port takes a TCP connection; return the
    HOST:PORT Ray will use. ``time.sleep`` between attempts lets SIGTERM and Ctrl-C in.

    Raises:
        AvnError: no cluster found (``auto``) or none reachable in time, naming the address tried.
    """
    import socket
    import time

    from ray._private.services import canonicalize_bootstrap_address

    try:  # a Ray Client URI (ray://HOST:PORT) is probed at its HOST:PORT
        resolved = address.split("://", 1)[1] if "://" in address else canonicalize_bootstrap_address(address)
    except ValueError:
        raise UsageError(f"--address {address}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)") from None
    except ConnectionError as err:  # auto, and no cluster found
        raise AvnError(f"--address {address}: {err}") from None
    if resolved is None:
        raise AvnError(f"--address {address}: no running Ray cluster found on this machine (start one with "
                       "`ray start --head`, or give HOST:PORT)")  # fmt: skip
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    shown = address if resolved == address else f"{address} ({resolved})"
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(left, 5.0))):
                return resolved
        except OSError as err:
            last = err.strerror or str(err) or type(err).__name__
        if time.monotonic() + 0.5 > deadline:
            raise AvnError(f"--address {shown}: no Ray cluster could be reached within {timeout_s:g} s ({last}); "
                           f"check the address (`ray status` on the head prints it), or wait longer with "
                           f"--connect-timeout SECONDS or {CONNECT_TIMEOUT_ENV}")  # fmt: skip
        time.sleep(0.5)


def _probe_auth(resolved: str, timeout_s: float) -> bool:
    """Whether the GCS at ``resolved`` refuses this client's token (one RPC, in a thread that cannot hold
    the driver longer than ``timeout_s``); any other outcome is left to ``ray.init``."""
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            from ray._raylet import GcsClient

            GcsClient(address=resolved)
            outcome.append(None)
        except BaseException as err:  # classified below, never raised from the thread
            outcome.append(err)

    thread = threading.Thread(target=probe, name="avn-study-auth-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(outcome) and outcome[0] is not None and _is_auth_error(outcome[0])


def _enable_token_if_available(address: str) -> None:
    """Ray turns token authentication on by itself only for ``auto``; for an explicit HOST:PORT, use it
    when ``RAY_AUTH_MODE`` is unset and a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``), as ``ray start`` does. ``RAY_AUTH_MODE=disabled`` keeps it off.

    Raises:
        UsageError: a token source is set but unreadable (``RAY_AUTH_TOKEN_PATH`` naming a missing file).
    """
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return
    try:
        found = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
        if found and mode is None:
            _enable_token_auth()  # what Ray does for `auto` (without its "enabled for this cluster" warning)
    except Exception as err:  # Ray's AuthenticationError: a token source that cannot be read
        if not _is_auth_error(err):
            raise
        reason = str(getattr(err, "message", err))
        raise UsageError(f"--address {address}: Ray cannot read this client's authentication token ({reason}); "
                         f"set one of {AUTH_VARIABLES} to the cluster's token (`ray get-auth-token` on the head "
                         "prints it), see docs/cluster.md") from None  # fmt: skip


def init_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
             connect_timeout_s: float | None = None) -> None:  # fmt: skip
    """Join a cluster (``auto`` or HOST:PORT) or start Ray on this machine (``num_gpus``: logical GPUs,
    for simulations such as ``bench cluster``; default: the GPUs Ray detects).

    Args:
        address: ``auto``, HOST:PORT, or None for a fresh local Ray.
        num_cpus: CPUs of a local Ray.
        num_gpus: logical GPUs of a local Ray.
        connect_timeout_s: how long to wait for ``address`` (default :func:`connect_timeout`).

    Raises:
        AvnError: the cluster cannot be reached in time (exit 1).
        UsageError: the cluster refused this client's token, or a local Ray has no writable temporary
            folder (exit 2).
    """
    # quiet drivers: our ProgressView replaces Ray's tables; snapshot warnings are noise for short epochs
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not address:  # "local": a fresh Ray on this machine, never a cluster that `ray start` left running here
        check_ray_tmpdir()
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
        return
    _join_cluster(address, connect_timeout(connect_timeout_s), kwargs)


def _join_cluster(address: str, timeout_s: float, kwargs: dict[str, Any]) -> None:
    """``ray.init`` on ``address`` once its GCS answers, SIGTERM stopping the wait as Ctrl-C does.

    Raises:
        AvnError: the cluster cannot be reached in time or cannot be joined.
        UsageError: the cluster refused this client's token.
    """
    import signal

    import ray

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        print(f"joining the Ray cluster at {address} (waiting up to {timeout_s:g} s)", file=sys.stderr, flush=True)
        resolved = _reach(address, timeout_s)
        _enable_token_if_available(address)
        refused = UsageError(
            f"--address {address}: the Ray cluster at {resolved} refused this client's authentication token "
            f"(token authentication is on there, RAY_AUTH_MODE=token); give this machine the cluster's token in "
            f"{AUTH_VARIABLES} (`ray get-auth-token` on the head prints it), see docs/cluster.md"
        )
        # at once, where ray.init would retry for 20 s first (a Ray Client URI is left to ray.init)
        if "://" not in address and _probe_auth(resolved, timeout_s):
            raise refused
        try:
            ray.init(address=address, **kwargs)
        except Exception as err:  # Ray gives ConnectionError, RuntimeError or AuthenticationError
            if _is_auth_error(err):
                raise refused from None
            if isinstance(err, ConnectionError | RuntimeError):
                raise AvnError(f"--address {address}: could not join the Ray cluster at {resolved} ({err})") from None
            raise
    finally:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is \
                _raise_on_sigterm:  # fmt: skip
            signal.signal(signal.SIGTERM, previous)
