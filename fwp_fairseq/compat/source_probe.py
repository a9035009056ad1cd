"""Read a fairseq function's source for a shim's ``needed()`` probe, without ever failing.

A fairseq installed without its sources (zipped, .pyc only) makes ``inspect.getsource`` raise
OSError (or TypeError for objects it cannot place); the plugin must still load. When the source
cannot be read the probe gives the shim's conservative answer, and says so in the log."""
import inspect
import logging

logger = logging.getLogger(__name__)


def probe_source(shim, obj, test, *, if_unreadable, why):
    """test(source of obj) -> bool; if_unreadable (logged with `why`) when the source is absent.

    shim: the shim's name, for the log; why: why if_unreadable is the safe answer."""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError) as e:
        name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
        logger.warning(f"{shim}: cannot read the source of fairseq's {name} ({type(e).__name__}: {e}); "
                       f"{'applying' if if_unreadable else 'skipping'} the fix, since {why}")
        return if_unreadable
    return bool(test(source))
