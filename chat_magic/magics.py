"""The IPython extension: ``%%chat``, ``%chat``, ``%chat_autonotify`` and ``%chat_thread``.

``%load_ext chat_magic`` registers :class:`ChatMagics`. The magics are thin
adapters: they parse the line, run the cell exactly as IPython would (the
user still sees its output, its ``Out[n]`` and its traceback) while a
bounded copy of what it printed is kept, build one
:class:`~chat_magic.report.Report` and queue it into the session's thread
(:func:`chat_magic.session.current_session`). Queueing returns at once; the
background worker delivers. Nothing here talks HTTP.

A user's mistake (no webhook, an unknown space, a bad option, empty text) is
a one-line :class:`~IPython.core.error.UsageError`. A problem while queueing
after a cell ran is one ``chat_magic: ...`` line on stderr; it never changes
the cell's own result.

Configuration (``%config ChatMagics`` lists it; ``c.ChatMagics.x = ...`` in
``ipython_config.py``): ``to``, ``thread_key``, ``autonotify_threshold``,
``max_lines``, ``max_chars``, ``cards``, ``runall_quiet``.
"""

from __future__ import annotations

import re
import shlex
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Int, TraitError, Unicode, validate

from . import config, rules
from .cells import cell_error, cell_title
from .console import say as _warn
from .errors import ChatMagicError, ConfigError, MessageError
from .message import strip_ansi, tail
from .report import Report, remember_cell, should_post, status_of
from .session import Session, current_session
from .webhook import Webhook, redact

__all__ = ["ChatMagics", "NestedRun", "OutputTail", "load_ipython_extension", "unload_ipython_extension"]

_DEFAULT_REPR = re.compile(r"^<.*(?: object(?: at 0x[0-9a-fA-F]+)?| at 0x[0-9a-fA-F]+)>$", re.S)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _tell_if_refused(receipt: Any) -> None:
    """Once the space has answered, one warning line if it refused the message.

    Called from the delivery thread; in a kernel the line shows under the
    cell that ran last. The exit summary does not repeat it.
    """

    def done(r: Any) -> None:
        if r.status == "failed":
            _warn(f"message not delivered: {r.error}")
            r.mark_reported()

    receipt.add_done_callback(done)


def _usage(text: object) -> UsageError:
    return UsageError(" ".join(redact(text).split()))


# -- capture ---------------------------------------------------------------------


class OutputTail:
    """The last ``limit`` characters written to it, and how many were dropped before them.

    Memory stays bounded whatever a cell prints: chunks are kept in a deque and
    dropped from the front once the total exceeds ``limit``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self._chunks: deque[str] = deque()
        self._size = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            if len(text) > self.limit:
                self.dropped += len(text) - self.limit
                text = text[len(text) - self.limit:]
            self._chunks.append(text)
            self._size += len(text)
            while self._size > self.limit:
                first = self._chunks[0]
                excess = self._size - self.limit
                if len(first) <= excess:
                    self._chunks.popleft()
                    self._size -= len(first)
                    self.dropped += len(first)
                else:
                    self._chunks[0] = first[excess:]
                    self._size -= excess
                    self.dropped += excess

    def text(self) -> str:
        with self._lock:
            return "".join(self._chunks)


def describe_display(data: Any) -> str:
    """What a display (or a result) looks like in a chat message.

    Its ``text/plain`` form when that is all it has or says something useful
    (a DataFrame's table); else a summary such as ``[image/png]``,
    ``[text/html]`` or ``[widget]``.
    """
    if not isinstance(data, dict):
        return ""
    plain = data.get("text/plain")
    plain = plain if isinstance(plain, str) else ""
    rich = [m for m in data if m != "text/plain"]
    if not rich:
        return plain
    if WIDGET_MIME in rich:
        return "[widget]"
    images = [m for m in rich if m.startswith("image/")]
    if images:
        return f"[{images[0]}]"
    if plain and not _DEFAULT_REPR.match(plain.strip()):
        return plain
    return f"[{rich[0]}]"


MAX_KEPT_FIGURES = 16


def _posted_displays(figures: Any, capture: Capture | None) -> int:
    """How many of the images a cell displayed go into the card (their ``[image/png]`` lines are left out of the output)."""
    if figures is None or not figures.postable or capture is None:
        return 0
    return sum(1 for i in figures.taken if i < len(capture.figures))


def _drop_image_lines(text: str, n: int) -> str:
    """``text`` without its first ``n`` ``[image/png]`` / ``[image/jpeg]`` lines (those figures are in the card)."""
    if n <= 0:
        return text
    kept = []
    for line in text.splitlines(keepends=True):
        if n and line.rstrip("\r\n") in ("[image/png]", "[image/jpeg]"):
            n -= 1
            continue
        kept.append(line)
    return "".join(kept)


def _display_image(data: dict[str, Any]) -> bytes | None:
    """The PNG or JPEG bytes of a display (base64 text in a kernel, bytes in a terminal), else None."""
    for mime in ("image/png", "image/jpeg"):
        value = data.get(mime)
        if isinstance(value, str):
            import base64
            import binascii

            try:
                return base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError):
                return None
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
    return None


class Capture:
    """While installed, keeps a bounded copy of stdout, stderr and display summaries.

    It wraps ``sys.stdout.write`` / ``sys.stderr.write`` (as IPython's own
    output history does) and ``shell.display_pub.publish``: everything still
    goes where it went; a copy of the text (and a one-line summary of each rich
    display) goes into :attr:`tail`. What IPython writes itself while showing
    a result or a traceback is not copied (the report has its own).
    """

    def __init__(self, shell: Any, limit: int) -> None:
        self.shell = shell
        self.tail = OutputTail(limit)
        self.active = False
        self._undo: list[tuple[Any, str, Any, bool, Callable]] = []
        self._own = 0  # > 0 while IPython itself writes (IPython 7 has no is_publishing / is_active / showing_traceback)
        self.figures: list[bytes] = []  # PNG/JPEG bytes of the images displayed, in order (the first few)
        self.tables: list[str] = []  # text of the DataFrames displayed

    def _busy(self) -> bool:
        sh = self.shell
        return bool(
            self._own
            or getattr(getattr(sh, "display_pub", None), "is_publishing", False)
            or getattr(getattr(sh, "displayhook", None), "is_active", False)
            or getattr(sh, "showing_traceback", False)
        )

    def _patch(self, obj: Any, attr: str, make: Callable[[Callable], Callable]) -> None:
        try:
            original = getattr(obj, attr)
            own = attr in getattr(obj, "__dict__", {})
            wrapper = make(original)
            setattr(obj, attr, wrapper)
        except (AttributeError, TypeError):
            return
        self._undo.append((obj, attr, original, own, wrapper))

    def install(self) -> Capture:
        self.active = True

        def stream_writer(original: Callable) -> Callable:
            def write(data: Any, *args: Any, **kwargs: Any) -> Any:
                result = original(data, *args, **kwargs)
                if self.active and isinstance(data, str):
                    try:
                        if not self._busy():
                            self.tail.write(data)
                    except Exception:
                        pass
                return result

            return write

        def publisher(original: Callable) -> Callable:
            def publish(data: Any, *args: Any, **kwargs: Any) -> Any:
                if self.active and not kwargs.get("update"):
                    try:
                        line = describe_display(data)
                        if line:
                            self.tail.write(line if line.endswith("\n") else line + "\n")
                        self.keep_rich(data)
                    except Exception:
                        pass
                return quiet(original)(data, *args, **kwargs)

            return publish

        def quiet(original: Callable) -> Callable:
            def call(*args: Any, **kwargs: Any) -> Any:
                self._own += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self._own -= 1

            return call

        for name in ("stdout", "stderr"):
            stream = getattr(sys, name, None)
            if stream is not None:
                self._patch(stream, "write", stream_writer)
        display_pub = getattr(self.shell, "display_pub", None)
        if display_pub is not None:
            self._patch(display_pub, "publish", publisher)
        for obj, attr in ((self.shell, "showtraceback"), (self.shell, "showsyntaxerror"),
                          (getattr(self.shell, "displayhook", None), "write_output_prompt"),
                          (getattr(self.shell, "displayhook", None), "write_format_data")):
            if obj is not None and hasattr(obj, attr):
                self._patch(obj, attr, quiet)
        return self

    def keep_rich(self, data: Any) -> None:
        """Keep a display's image bytes (PNG/JPEG) and a DataFrame's text, for the notice's card."""
        if not isinstance(data, dict):
            return
        image = _display_image(data)
        if image is not None and len(self.figures) < MAX_KEPT_FIGURES:
            self.figures.append(image)
        elif image is None and "dataframe" in str(data.get("text/html") or "")[:2000] and len(self.tables) < 4:
            plain = data.get("text/plain")
            if isinstance(plain, str) and plain.strip():
                self.tables.append(plain)

    def remove(self) -> None:
        """Put back what :meth:`install` wrapped (if nobody wrapped it since)."""
        self.active = False
        while self._undo:
            obj, attr, original, own, wrapper = self._undo.pop()
            try:
                if obj.__dict__.get(attr) is wrapper:
                    if own:
                        setattr(obj, attr, original)
                    else:
                        delattr(obj, attr)
            except Exception:
                pass  # a wrapper left in place passes everything through: it is inactive


# -- helpers -----------------------------------------------------------------


def _split_options(line: str, takes_value: set[str]) -> tuple[list[str], str]:
    """Leading ``--options`` of ``line`` and the rest, kept exactly as typed."""
    rest = line.lstrip()
    opts: list[str] = []
    token = re.compile(r"""("[^"]*"|'[^']*'|\S+)\s*""")
    while rest.startswith("-"):
        m = token.match(rest)
        if m is None:
            break
        tok, rest = m.group(1), rest[m.end():]
        if tok == "--":
            break
        opts.append(tok)
        if tok in takes_value:
            m = token.match(rest)
            if m:
                opts.append(m.group(1))
                rest = rest[m.end():]
    return opts, rest


class _CellNumber:
    """While installed, IPython compiles cells under ``number`` (what their tracebacks call ``Cell In[number]``).

    IPython 8+ counts the next cell from the moment one starts, so a cell run
    inside a cell would be named after a prompt that does not exist yet.
    """

    def __init__(self, compiler: Any, number: int | None) -> None:
        self._compiler = None
        if compiler is None or not isinstance(number, int) or "cache" in vars(compiler):
            return
        original = compiler.cache

        def cache(code: str, _number: int = 0, *args: Any, **kwargs: Any) -> Any:
            name = original(code, number, *args, **kwargs)
            if isinstance(name, str):
                remember_cell(name, number)  # IPython 7 keeps no record of it: the card's traceback needs it
            return name

        compiler.cache = cache
        self._compiler = compiler

    def remove(self) -> None:
        if self._compiler is not None:
            vars(self._compiler).pop("cache", None)
            self._compiler = None


class NestedRun:
    """Runs a ``%%chat`` cell's body as IPython runs any cell, and records how it went.

    - What the body prints is copied into a bounded :class:`Capture` while it runs.
    - The body is compiled under the number of the cell that holds it, so its
      traceback says ``Cell In[4]`` under prompt ``[4]`` (IPython 8+ has moved
      on to the next number by then), and its ``Out[4]`` too.
    - IPython's record of the outer cell's result (the nested run resets it)
      is put back after.
    - A failure of the body fails the outer cell too, with no second
      traceback: Run All stops there and the kernel reports an error.
    """

    def __init__(self, shell: Any, capture_limit: int) -> None:
        self.shell = shell
        self.capture_limit = capture_limit
        hook = getattr(shell, "displayhook", None)
        self._hook = hook
        self._outer = getattr(hook, "exec_result", None)
        number = getattr(self._outer, "execution_count", None)
        self.number: int | None = number if number is not None else getattr(shell, "execution_count", None)
        self.capture: Capture | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.duration = 0.0

    def run(self, cell: str) -> NestedRun:
        shell = self.shell
        self.capture = Capture(shell, self.capture_limit).install()
        numbering = _CellNumber(getattr(shell, "compile", None), self.number)
        start = time.perf_counter()
        try:
            self.result = shell.run_cell(cell, store_history=False)
        finally:
            self.duration = time.perf_counter() - start
            numbering.remove()
            self.capture.remove()
            if self._hook is not None and self._outer is not None:
                self._hook.exec_result = self._outer
        result = self.result
        if result is not None:
            self.error = cell_error(result)
        outer = self._outer
        if self.error is not None and outer is not None and cell_error(outer) is None:
            outer.error_in_exec = self.error
        return self


# -- the magics ----------------------------------------------------------------


def _destination_args(func: Callable) -> Callable:
    """Options shared by every magic that posts."""
    func = argument(
        "--mention", metavar="WHO",
        help=f"mention someone: {rules.MENTION_HELP}. Only this option ever mentions anyone.",
    )(func)
    func = argument(
        "--to", metavar="NAME",
        help="a space name from the config file (default: ChatMagics.to, else GOOGLE_CHAT_WEBHOOK_URL).",
    )(func)
    return func


def _output_probe(capture: Any) -> Callable[[], tuple[int, str]]:
    """(characters printed so far, last line) of a cell: what the stall watcher looks at (stalls.py)."""
    def probe() -> tuple[int, str]:
        tail = capture.tail
        text = tail.text()
        lines = [ln for ln in text[-2000:].splitlines() if ln.strip()]
        return tail.dropped + len(text), strip_ansi(lines[-1])[:300] if lines else ""
    return probe


def _plain_help(func: Callable) -> Callable:
    """The help page (``%%chat?``) as plain text: without the reST ``::`` line IPython puts before the usage.

    ``magic_arguments`` writes the usage as a literal block for Sphinx; in a
    notebook or a terminal the bare ``::`` is noise. Applied above
    ``@magic_arguments`` (it rewrites the docstring that one built).
    """
    doc = func.__doc__ or ""
    head, sep, rest = doc.partition("\n\n")
    if head.strip() == "::":
        usage, sep, rest = rest.partition("\n\n")
        first, *more = textwrap.dedent(usage).splitlines()
        indent = " " * (first.find(" ") + 1)  # continuation lines under the first option
        func.__doc__ = "\n".join([first, *(indent + m.strip() for m in more)]) + sep + rest
    return func


class _Cell:
    """A cell seen by the auto-notify callbacks."""

    __slots__ = ("info", "start", "capture", "handled", "armed")

    def __init__(self, info: Any, capture: Capture | None) -> None:
        self.info = info
        self.start = time.perf_counter()
        self.capture = capture
        self.handled = False
        self.armed: Any = None  # the cell's death notice while it runs (deadman.py)


@magics_class
class ChatMagics(Magics):
    """Post cell results and completions to a Google Chat space (``%load_ext chat_magic``)."""

    shell: Any  # IPython's InteractiveShell (Magics types it Optional; a registered magic always has one)

    to = Unicode("", help="Default destination: a space name from the config file ('' = GOOGLE_CHAT_WEBHOOK_URL).").tag(config=True)
    thread_key = Unicode("", help="Thread key for this session's messages ('' = a new thread per kernel session).").tag(config=True)
    autonotify_threshold = Float(60.0, min=0.0, help="%chat_autonotify: seconds after which a finished cell is announced.").tag(config=True)
    max_lines = Int(40, min=0, help="Lines of output (the tail) a message shows.").tag(config=True)
    max_chars = Int(3000, min=100, help="Characters of output (the tail) a message shows.").tag(config=True)
    cards = Bool(True, help="Post notices as cards (with a plain-text fallback); False: plain text.").tag(config=True)
    runall_quiet = Float(3.0, min=0.0,
                         help="%chat_autonotify --run-all: idle seconds after a cell that end a run of cells.").tag(config=True)

    @validate("to")
    def _check_to(self, proposal: Any) -> str:
        value = proposal["value"]
        if "://" in value:
            raise TraitError(
                f"ChatMagics.to takes a space name: put the webhook URL under [spaces.NAME] in {config.config_path()} "
                f"or in {config.ENV_URL}, not in a notebook"
            )
        return value

    @validate("thread_key")
    def _check_thread_key(self, proposal: Any) -> str:
        if not proposal["value"].strip():
            return ""  # '' = a new thread per kernel session
        try:
            return rules.validate_thread_key(proposal["value"], option="ChatMagics.thread_key") or ""
        except ConfigError as e:
            raise TraitError(str(e)) from None

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._applied: tuple[Any, str] | None = None
        self._cells: list[_Cell] = []
        self._auto: dict[str, Any] | None = None  # settings while auto-notify is on
        self._callbacks = {"pre_run_cell": self._pre_run_cell, "post_run_cell": self._post_run_cell}
        self._registered = False
        self._runall: Any = None  # the runall.RunAll tracker while --run-all is on

    # -- shared pieces -----------------------------------------------------

    def _session(self) -> Session:
        s = current_session(self.shell.user_ns)
        key = self.thread_key.strip()
        if key and s.thread_key != key and not (self._applied and self._applied[0] is s and self._applied[1] == key):
            s.new_thread(key)
        if key:
            self._applied = (s, key)
        return s

    def _parse(self, func: Callable, magic: str, line: str) -> Any:
        try:
            argv = shlex.split(line)
        except ValueError as e:
            raise _usage(f"{magic}: {e} in the options (see {magic}?)") from None
        try:
            return func.parser.parse_args(argv)  # type: ignore[attr-defined]  # added by @magic_arguments
        except UsageError as e:
            raise _usage(f"{magic}: {e} (see {magic}?)") from None

    def _destination(self, magic: str, to: str | None) -> Webhook:
        """The webhook a magic posts to; a mistake is a one-line UsageError."""
        name = (to or "").strip() or self.to.strip() or None
        try:
            webhook = config.resolve(name)
        except ConfigError as e:
            raise _usage(f"{magic}: {e}") from None
        if name and "://" in name:
            _warn(
                f"{magic} --to has a webhook URL ({webhook.redacted}): it is saved with the notebook and anyone who "
                f"reads it can post to the space; set {config.ENV_URL} or add a space to {config.config_path()} and use --to NAME"
            )
        return webhook

    @staticmethod
    def _mention(magic: str, who: str | None) -> str | None:
        try:
            return rules.validate_mention(who, option="--mention")
        except ConfigError as e:
            raise _usage(f"{magic}: {e}") from None

    def _post(self, report: Report, webhook: Webhook, figures: Any = None, armed: Any = None) -> None:
        """Queue ``report`` into the session thread (disarming ``armed`` in the same transaction); a problem is one warning line."""
        try:
            cards = self.cards or bool(figures is not None and figures.postable)  # an image needs a card
            receipt = self._session().send(to=webhook, keep_on_fault=True, figures=figures,
                                           disarm=armed.replacing() if armed is not None else None,
                                           **report.payload_kwargs(cards=cards))
            if armed is not None:
                armed.replaced = True  # the card's transaction disarmed it
            _tell_if_refused(receipt)
            from .deadman import mark_important

            mark_important(receipt)
        except (ChatMagicError, OSError, ValueError) as e:
            _warn(f"message not queued: {e}")
        except Exception as e:  # never let a notice break the user's cell
            _warn(f"message not queued: {type(e).__name__}: {e}")

    def _report(
        self,
        *,
        title: str,
        error: BaseException | None,
        duration: float,
        capture: Capture | None,
        result: Any,
        number: int | None,
        webhook: Webhook,
        mention: str | None,
        max_lines: int,
        with_output: bool = True,
        drop_images: int = 0,
    ) -> Report:
        output, cut = "", 0
        if with_output and capture is not None:
            output, cut = _drop_image_lines(capture.tail.text(), drop_images), capture.tail.dropped
            if result is not None:
                shown = self._result_text(result)
                if shown:
                    label = f"Out[{number}]: " if number is not None else "Out: "
                    output += ("" if not output or output.endswith("\n") else "\n") + label + shown
            output = webhook.scrub(strip_ansi(output), cut_before=cut > 0)  # the whole text, before tail() cuts it
            output, more = tail(output, self.max_chars, None)
            cut += more
        return Report.from_outcome(
            title or (f"Cell [{number}]" if number is not None else "Cell"),
            error,
            scrub=webhook.scrub,
            shell=self.shell,
            with_traceback=with_output,
            duration=duration,
            output=output,
            output_cut=cut,
            mention=mention,
            max_lines=max_lines,
        )

    def _arm(self, title: str, webhook: Webhook, stall_after: float | None = None, capture: Any = None) -> Any:
        """The cell's death notice, written before it runs (deadman.py); None if it cannot be. Never raises."""
        try:
            from . import arming
            from .notify import origin_details

            session = self._session()
            return arming.arm(webhook, session.thread_key, title=title, details=origin_details(session), cards=self.cards,
                              to=(self._auto or {}).get("to") or self.to.strip() or None, stall_after=stall_after,
                              probe=_output_probe(capture) if capture is not None else None)
        except Exception as e:
            _warn(f"could not arm the death notice of {title!r}: {type(e).__name__}: {e}")
            return None

    @staticmethod
    def _disarm(armed: Any) -> None:
        if armed is not None:
            armed.disarm()

    def _needs_running_loop(self, cell: str) -> bool:
        """Whether ``cell`` has top-level ``await`` while an event loop already runs this thread (a kernel)."""
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False  # terminal IPython runs such cells on a loop of its own
        try:
            return bool(self.shell.should_run_async(cell, transformed_cell=self.shell.transform_cell(cell)))
        except Exception:
            return False

    def _result_text(self, value: Any) -> str:
        try:
            data, _ = self.shell.display_formatter.format(value)
            return describe_display(data)
        except Exception:
            try:
                return repr(value)
            except Exception:
                return f"<{type(value).__name__}>"

    # -- %%chat ----------------------------------------------------------------

    @_plain_help
    @magic_arguments("%chat")
    @_destination_args
    @argument("--title", metavar="TEXT", help="the notice's title (default: the cell's first # comment, else 'Cell [n]').")
    @argument("--on-error", action="store_true", help="post only when the cell fails (an interrupt is not a failure).")
    @argument("--no-output", action="store_true", help="leave the cell's output and traceback out (status and error line only).")
    @argument("--max-lines", type=int, metavar="N", help="lines of output to show (default: ChatMagics.max_lines).")
    @argument("--new-thread", action="store_true", help="start a fresh thread for this session before posting.")
    @argument("--max-figures", type=int, default=4, metavar="N", help="post at most N of the figures the cell displays (default 4).")
    @argument("--no-figures", action="store_true", help="post no figures or tables, only the text.")
    @cell_magic("chat")  # type: ignore[arg-type]  # IPython types the decorated method as Never
    def chat_cell(self, line: str, cell: str) -> None:
        """Run the cell as usual, then post how it went to Google Chat.

        The cell runs exactly as without the magic: its output, its result and
        its traceback show as usual. Then one message goes to this session's
        thread: the title (`--title`, else the cell's first `#` comment,
        else `Cell [n]`), ok / failed / interrupted, the duration, and the
        tail of what the cell printed (stdout, stderr, its result; HTML as
        `[text/html]`), with the exception and the last traceback lines if it
        failed. The figures it displays (the first `--max-figures`, 4) go
        into the card through your image store (`CHAT_MAGIC_IMAGE_STORE`,
        see the README's "Figures"), and a DataFrame result as a table.
        Output never mentions anyone: only `--mention`
        does. Posting only queues the message: the cell never waits for the
        network.

        The space is `GOOGLE_CHAT_WEBHOOK_URL` or a named space in the
        config file (`--to NAME`); keep webhook URLs out of notebooks.

        Example:

            %%chat --on-error --mention all
            # Nightly training
            train(model)
        """
        magic = "%%chat"
        args = self._parse(self.chat_cell, magic, line)
        mention = self._mention(magic, args.mention)
        max_lines = self.max_lines if args.max_lines is None else args.max_lines
        if max_lines < 0:
            raise _usage(f"{magic}: --max-lines takes a number >= 0, not {max_lines}")
        if args.title is not None and not args.title.strip():
            raise _usage(f'{magic}: --title is empty: give a title such as --title "Train the model"')
        if self._needs_running_loop(cell):
            raise _usage(
                f"{magic}: a cell with top-level await cannot run inside a magic here (the kernel's event loop "
                "is busy running this cell): put the awaits in a plain cell and post with %chat at its end"
            )
        webhook = self._destination(magic, args.to)  # before the cell runs: a mistake costs no run
        if args.new_thread:
            self._session().new_thread()

        for frame in self._cells:  # auto-notify leaves this cell to us
            frame.handled = True
            self._disarm(frame.armed)
            frame.armed = None
        title = args.title.strip() if args.title else cell_title(cell)
        armed = self._arm(title or f"Cell [{self.shell.execution_count}]", webhook)
        try:
            ran = NestedRun(self.shell, max(4 * self.max_chars, 8192)).run(cell)
        except BaseException:
            self._disarm(armed)
            raise
        if not should_post(status_of(ran.error), on_error=args.on_error):
            self._disarm(armed)
            return None
        result = getattr(ran.result, "result", None)
        figures, sections, result = self._rich(ran, result, args)
        report = self._report(
            drop_images=_posted_displays(figures, ran.capture),
            title=args.title.strip() if args.title else cell_title(cell),
            error=ran.error,
            duration=ran.duration,
            capture=ran.capture,
            result=result,
            number=ran.number,
            webhook=webhook,
            mention=mention,
            max_lines=max_lines,
            with_output=not args.no_output,
        )
        if figures is not None:
            report.figures, report.note = figures.widgets(), figures.note()
        report.sections = sections
        self._post(report, webhook, figures, armed)
        self._disarm(armed)  # the notice's transaction deleted it (else: now)
        return None

    def _rich(self, ran: NestedRun, result: Any, args: Any) -> tuple[Any, list[dict[str, Any]], Any]:
        """The figures a cell displayed (and its result, if an image) and its DataFrames as table sections.

        Returns ``(Figures or None, sections, result)``: a DataFrame result
        shown as a table is not repeated as text. Never raises.
        """
        if args.no_figures or ran.capture is None or args.no_output:
            return None, [], result
        from . import tables

        sections: list[dict[str, Any]] = []
        images = list(ran.capture.figures)
        result_at = -1  # where the result's own image is in ``images``
        try:
            if result is not None and tables.is_frame(result) and self.cards:
                label = f"Out[{ran.number}]" if ran.number is not None else "Result"
                sections.append(tables.frame_section(result, label=label))
                result = None
            elif result is not None:
                shown = _display_image(self.shell.display_formatter.format(result)[0])
                if shown is not None:
                    images.append(shown)
                    result_at = len(images) - 1
                elif type(result).__module__.startswith("plotly"):
                    images.append(result)  # plotly shows as HTML: its static export (kaleido) is posted
            if self.cards:
                sections += [tables.text_section(t) for t in ran.capture.tables]
        except Exception as e:  # a table or figure never costs the notice
            _warn(f"a table or figure was left out: {type(e).__name__}: {e}")
        if not images:
            return None, sections, result
        from .images import Figures

        name = (args.to or "").strip() or self.to.strip() or None
        figures = Figures.collect(images, to=name, max_figures=max(0, args.max_figures))
        if figures.postable and result_at in figures.taken:
            result = None  # the result is the card's image: no "Out: [image/png]" line too
        return figures, sections, result

    # -- %chat -----------------------------------------------------------------

    @_plain_help
    @magic_arguments("chat")
    @_destination_args
    @argument("text", nargs="*", help="the message, in Chat syntax (*bold*, _italic_, `code`); $name and {expression} are expanded.")
    @line_magic("chat")  # type: ignore[arg-type]  # IPython types the decorated method as Never
    def chat_line(self, line: str) -> None:
        """Post a line of text to this session's Google Chat thread.

        `$name` and `{expression}` are replaced by their values, as in any
        line magic; write `$$` for a literal `$` and `{{` `}}` for
        literal braces (`%chat costs $$5` posts "costs $5"). The text is
        yours: Chat syntax such as `*bold*` works. Options come first; use
        `--` before text that starts with `-`.

        Example:

            %chat Training done: loss *{round(loss, 3)}* after $epochs epochs
        """
        magic = "%chat"
        opts, text = _split_options(line, {"--to", "--mention"})
        args = self._parse(self.chat_line, magic, " ".join(opts))
        text = text.strip()
        if not text:
            raise _usage(f"{magic}: nothing to post: write %chat TEXT, e.g. %chat training done, loss $loss")
        mention = self._mention(magic, args.mention)
        webhook = self._destination(magic, args.to)
        if mention:
            text = f"{rules.mention_tag(mention)} {text}"
        try:
            _tell_if_refused(self._session().send(text, to=webhook, keep_on_fault=True))
        except (ConfigError, MessageError) as e:
            raise _usage(f"{magic}: {e}") from None
        except (ChatMagicError, OSError) as e:
            _warn(f"message not queued: {e}")

    # -- %chat_autonotify ----------------------------------------------------------

    @_plain_help
    @magic_arguments("chat_autonotify")
    @_destination_args
    @argument("--threshold", type=rules.seconds_arg(most=7 * rules.DAY), metavar="SECONDS",
              help="announce cells that run at least this long (default: ChatMagics.autonotify_threshold, 60).")
    @argument("--on-error", action="store_true", help="announce only cells that fail (an interrupt is not a failure).")
    @argument("--run-all", action="store_true",
              help="one summary per run of back-to-back cells (Run All) instead of a notice per cell; with --threshold, both.")
    @argument("--quiet", type=rules.seconds_arg(), metavar="SECONDS",
              help="--run-all: idle seconds that end a run (default: ChatMagics.runall_quiet, 3).")
    @argument("--stall-after", type=rules.seconds_arg(above=True, most=7 * rules.DAY), metavar="SECONDS",
              help="post a line when a running cell prints nothing for this long, and when it moves again.")
    @argument("state", nargs="?", choices=["on", "off"], default="on", help="'off' stops auto-notify.")
    @line_magic("chat_autonotify")  # type: ignore[arg-type]  # IPython types the decorated method as Never
    def chat_autonotify(self, line: str) -> None:
        """Announce every cell that fails or runs longer than a threshold.

        From now on, a cell that runs at least `--threshold` seconds (default
        `ChatMagics.autonotify_threshold`: 60) or fails posts a completion
        notice to this session's thread: its title, status, duration and the
        tail of its output. `%chat_autonotify off` stops it. `%%chat` cells
        post their own notice and are not announced twice.

        `--run-all` posts one summary per run of back-to-back cells instead
        (Run All, nbclient, papermill): cells run, total time, the slowest
        cells and the failing cell with its error. A run ends `--quiet`
        seconds after its last cell (`ChatMagics.runall_quiet`) or when the
        kernel shuts down. With `--threshold` too, slow cells still post
        their own notice.

        Example:

            %chat_autonotify --threshold 300
            %chat_autonotify --run-all
        """
        magic = "%chat_autonotify"
        args = self._parse(self.chat_autonotify, magic, line)
        if args.state == "off":
            was_on = self._auto is not None or self._runall is not None
            self._autonotify_off()
            print("chat_magic: auto-notify is off" if was_on else "chat_magic: auto-notify was not on")
            return
        if args.threshold is not None and not args.threshold >= 0:
            raise _usage(f"{magic}: --threshold takes seconds >= 0, not {args.threshold}")
        mention = self._mention(magic, args.mention)
        webhook = self._destination(magic, args.to)
        if args.run_all:
            self._start_runall(magic, args, webhook, mention)
            if args.threshold is None:
                return
        elif args.quiet is not None:
            raise _usage(f"{magic}: --quiet goes with --run-all")
        else:
            self._stop_runall()
        if args.stall_after is not None and not args.stall_after > 0:
            raise _usage(f"{magic}: --stall-after takes seconds > 0, not {args.stall_after}")
        self._auto = {"threshold": args.threshold, "on_error": args.on_error, "webhook": webhook, "mention": mention,
                      "to": args.to, "stall_after": args.stall_after}
        if not self._registered:
            for event, fn in self._callbacks.items():
                self.shell.events.register(event, fn)
            self._registered = True
        if args.on_error:
            print("chat_magic: auto-notify is on: cells that fail post a notice to this session's thread")
        else:
            secs = self._threshold()
            print(f"chat_magic: auto-notify is on: cells that fail or run {secs:g} s or longer post a notice to this session's thread")

    def _start_runall(self, magic: str, args: Any, webhook: Webhook, mention: str | None) -> None:
        """``--run-all``: replace what auto-notify did with one summary per run of cells (runall.py)."""
        from .notify import origin_details
        from .runall import RunAll

        quiet = self.runall_quiet if args.quiet is None else args.quiet
        if not quiet >= 0:
            raise _usage(f"{magic}: --quiet takes seconds >= 0, not {args.quiet}")
        self._autonotify_off()
        self._runall = RunAll(self.shell, lambda report: self._post(report, webhook), quiet=quiet,
                              threshold=self.autonotify_threshold if args.threshold is None else args.threshold,
                              mention=mention, details=lambda: origin_details(self._session()),
                              only_failures=args.on_error, scrub=webhook.scrub).start()
        print(f"chat_magic: auto-notify is on: one summary per run of cells "
              f"(a run ends {quiet:g} s after its last cell, or when the kernel stops)")

    def _stop_runall(self) -> None:
        if self._runall is not None:
            self._runall.stop()
            self._runall = None

    def _threshold(self) -> float:
        t = (self._auto or {}).get("threshold")
        return self.autonotify_threshold if t is None else t

    def _autonotify_off(self) -> None:
        self._auto = None
        self._stop_runall()
        if self._registered:
            for event, fn in self._callbacks.items():
                try:
                    self.shell.events.unregister(event, fn)
                except ValueError:
                    pass
            self._registered = False
        while self._cells:
            frame = self._cells.pop()
            self._disarm(frame.armed)
            if frame.capture is not None:
                frame.capture.remove()

    def _pre_run_cell(self, info: Any) -> None:
        try:
            capture = None
            if not self._cells and self._auto is not None:
                capture = Capture(self.shell, max(4 * self.max_chars, 8192)).install()
            frame = _Cell(info, capture)
            if len(self._cells) == 0 and self._auto is not None and (getattr(info, "raw_cell", "") or "").strip():
                raw = getattr(info, "raw_cell", "") or ""
                frame.armed = self._arm(cell_title(raw) or f"Cell [{self.shell.execution_count}]", self._auto["webhook"],
                                        self._auto.get("stall_after"), capture)
            self._cells.append(frame)
        except Exception as e:
            _warn(f"auto-notify: {type(e).__name__}: {e}")

    def _post_run_cell(self, result: Any) -> None:
        try:
            info = getattr(result, "info", None)
            idx = next((i for i in range(len(self._cells) - 1, -1, -1) if self._cells[i].info is info), None)
            if idx is None:  # an empty cell, or one that started before auto-notify
                return
            frame = None
            popped = []
            while len(self._cells) > idx:
                frame = self._cells.pop()
                popped.append(frame)
                if frame.capture is not None:
                    frame.capture.remove()
            try:
                if self._cells or frame is None or frame.handled or self._auto is None:
                    return  # a nested cell, or a %%chat cell that posted on its own
                self._announce(frame, result)
            finally:
                for f in popped:  # after the completion notice is queued
                    self._disarm(f.armed)
        except Exception as e:
            _warn(f"auto-notify: {type(e).__name__}: {e}")

    def _announce(self, frame: _Cell, result: Any) -> None:
        auto = self._auto or {}
        duration = time.perf_counter() - frame.start
        error = cell_error(result)
        if not should_post(status_of(error), on_error=bool(auto.get("on_error")), worth_it=duration >= self._threshold()):
            return
        raw = getattr(frame.info, "raw_cell", "") or ""
        figures, sections, shown = self._auto_rich(frame, result)
        report = self._report(
            title=cell_title(raw),
            error=error,
            duration=duration,
            capture=frame.capture,
            result=shown,
            number=getattr(result, "execution_count", None),
            webhook=auto["webhook"],
            mention=auto.get("mention"),
            max_lines=self.max_lines,
            drop_images=_posted_displays(figures, frame.capture),
        )
        if figures is not None:
            report.figures, report.note = figures.widgets(), figures.note()
        report.sections = sections
        self._post(report, auto["webhook"], figures, frame.armed)

    def _auto_rich(self, frame: _Cell, result: Any) -> tuple[Any, list[dict[str, Any]], Any]:
        """An announced cell's figures and tables, as ``%%chat`` takes them (the first :data:`images.MAX_FIGURES`)."""
        from types import SimpleNamespace

        from .images import MAX_FIGURES

        number = getattr(result, "execution_count", None)
        ran = SimpleNamespace(capture=frame.capture, number=number)
        opts = SimpleNamespace(no_figures=False, no_output=False, max_figures=MAX_FIGURES, to=(self._auto or {}).get("to"))
        return self._rich(ran, result.result, opts)  # type: ignore[arg-type]

    # -- %chat_compose ----------------------------------------------------------------

    @line_magic("chat_compose")  # type: ignore[arg-type]  # IPython types the decorated method as Never
    def chat_compose(self, line: str) -> Any:
        """Open a message composer: %chat_compose [--to SPACE] [--thread session|new|custom] [--key KEY]

        Write a message, see it as Chat will show it, and send it; the status
        line follows its delivery.
        """
        from .composer import compose_magic

        return compose_magic(line, self.shell)

    @line_magic("chat_setup")  # type: ignore[arg-type]  # IPython types the decorated method as Never
    def chat_setup(self, line: str) -> None:
        """Save a webhook without it touching the notebook: %chat_setup [NAME] [--default] [--test] (see chat_magic.spaces)."""
        from .spaces import setup_magic

        setup_magic(line)

    # -- %chat_thread --------------------------------------------------------------

    @_plain_help
    @magic_arguments("chat_thread")
    @argument("--new", action="store_true", help="start a fresh thread (announced again) for the rest of this session.")
    @argument("--name", metavar="NAME",
              help="the notebook's name in the thread header, where it cannot be detected (as CHAT_MAGIC_SOURCE).")
    @argument("key", nargs="?", help="use this thread key from now on (e.g. to continue a thread from an earlier session).")
    @line_magic("chat_thread")  # type: ignore[arg-type]  # IPython types the decorated method as Never
    def chat_thread(self, line: str) -> None:
        """Show this session's thread key, or start a new thread.

        Every message of a kernel session goes into one thread.
        `%chat_thread --new` starts a fresh one; `%chat_thread KEY` posts
        into the thread with that key from now on.
        """
        magic = "%chat_thread"
        args = self._parse(self.chat_thread, magic, line)
        try:
            wanted = rules.validate_thread_key(args.key)
        except ConfigError as e:
            raise _usage(f"{magic}: {e}") from None
        session = self._session()
        if args.name is not None:
            try:
                session.rename(args.name)
            except ConfigError as e:
                raise _usage(f"{magic}: {e}") from None
            print(f"chat_magic: this session's messages now say they come from {session.source}")
        if wanted:
            key = session.new_thread(wanted)
            print(f"chat_magic: this session now posts into thread {key}")
        elif args.new:
            key = session.new_thread()
            print(f"chat_magic: started a new thread: {key}")
        elif args.name is None:
            print(f"chat_magic: this session posts into thread {session.thread_key} ({session.origin})")

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Stop auto-notify and remove every hook this instance installed."""
        self._autonotify_off()


# -- load / unload ---------------------------------------------------------------


def _instance(ip: Any) -> ChatMagics | None:
    m = ip.magics_manager.registry.get("ChatMagics")
    return m if m is not None and hasattr(m, "close") and type(m).__name__ == "ChatMagics" else None


def load_ipython_extension(ip: Any) -> None:
    """Register :class:`ChatMagics` (``%load_ext chat_magic``)."""
    if _instance(ip) is not None:
        return
    magics = ChatMagics(shell=ip)  # Magics.__init__ adds it to ip.configurables
    if not any(c is magics for c in ip.configurables):
        ip.configurables.append(magics)
    ip.register_magics(magics)


def unload_ipython_extension(ip: Any) -> None:
    """Remove exactly what :func:`load_ipython_extension` (and auto-notify) installed."""
    magics = _instance(ip)
    if magics is None:
        return
    magics.close()
    manager = ip.magics_manager
    for kind, table in magics.magics.items():
        for name, fn in table.items():
            if manager.magics.get(kind, {}).get(name) == fn:
                del manager.magics[kind][name]
    if manager.registry.get("ChatMagics") is magics:
        del manager.registry["ChatMagics"]
    ip.configurables[:] = [c for c in ip.configurables if c is not magics]
