"""Figures in messages: normalised images, the user's image store, and the upload before the POST.

A webhook cannot upload a file: a card's ``image`` widget takes an
``imageUrl`` that Google fetches. So an image lives in a store the user owns
(``CHAT_MAGIC_IMAGE_STORE``):

- ``gs://bucket/prefix``: Google Cloud Storage, V4 signed URLs (or public ones
  under ``CHAT_MAGIC_IMAGE_BASE_URL``);
- ``s3://bucket/prefix``: S3 and S3-compatible stores, presigned URLs (boto3
  reads ``AWS_ENDPOINT_URL``, profiles and the rest of AWS's own set-up);
- ``file:///srv/www/chat`` with ``CHAT_MAGIC_IMAGE_BASE_URL``: a folder the
  team's web server already serves.

The caller's side is cheap and durable: :class:`Figures` turns what was
shown (PNG/JPEG bytes, a matplotlib figure, a PIL image, a path) into PNG or
JPEG bytes of a sensible size, and the card gets a placeholder URL naming the
bytes' SHA-256. The bytes go into the outbox with the message, in the same
transaction. The delivery worker calls :func:`fill` just before the POST:
it uploads each image under its content-addressed name (skipped when the
object is there already, so a retry or a second process never uploads twice,
and the card always points at the bytes that were shown), puts the URL in
the card, records the filled body (every retry sends the same body under its
``requestId``) and drops the bytes from the outbox. A store that refuses for
good (no permission, no bucket) costs the image, not the message: the notice
goes out with one line saying why.

Store credentials never leave the store's client: errors are built here from
status codes, never from a library's text; a signed URL goes into the card
and nowhere else (no log line carries one).
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .errors import ConfigError, MessageError

if TYPE_CHECKING:  # pragma: no cover
    from .delivery import Dispatcher
    from .outbox import Job

__all__ = [
    "Figures", "FolderStore", "GCSStore", "Image", "JPEG", "MAX_BYTES", "MAX_FIGURES", "PNG", "S3Store", "Store",
    "StoreError", "StoreSpec", "attach", "check_base_url", "fill", "fill_payload", "fit", "metrics_chart",
    "object_name", "open_store", "parse_expiry", "sniff", "store_spec", "strip_images", "to_image", "upload"
]

log = logging.getLogger("chat_magic")

ENV_STORE = "CHAT_MAGIC_IMAGE_STORE"
ENV_BASE_URL = "CHAT_MAGIC_IMAGE_BASE_URL"
ENV_EXPIRY = "CHAT_MAGIC_IMAGE_EXPIRY"
ENV_PATIENCE = "CHAT_MAGIC_IMAGE_PATIENCE"
PATIENCE = 120.0  # seconds a notice waits for a store that does not answer, then goes without its figures
PATIENCE_ATTEMPTS = 3  # ... or this many upload attempts, whichever comes first
STORE_TIMEOUT = 10.0  # seconds a store may take to answer one request: an upload attempt stays well inside the lease
MAX_INPUT_BYTES = 50_000_000  # a file or bytes bigger than this is refused before it is read
MAX_PIXELS = 60_000_000  # a bigger image is refused before it is decoded (a 50-megapixel figure is shrunk)
MAX_EXPIRY = 7 * 24 * 3600  # GCS V4 and S3 presigned URLs live at most 7 days
MAX_SIDE = 1600
MAX_BYTES = 2_000_000
MAX_FIGURES = 4
MAX_MESSAGE_BYTES = 32_000  # a whole Chat message (message.MAX_BYTES)
PLACEHOLDER = "chat-magic-image:"  # + sha256: replaced by the store's URL just before the POST
_PLACEHOLDER = re.compile(re.escape(PLACEHOLDER) + r"([0-9a-f]{64})")
PNG, JPEG = "image/png", "image/jpeg"
HINT = "set CHAT_MAGIC_IMAGE_STORE (see README: Figures)"

URL_ROOM = 2048  # bytes kept in a message for each signed URL

_hinted = False  # the no-store hint is said in full once per process
_hint_lock = threading.Lock()


# -- images ------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """PNG or JPEG bytes ready to upload, named by their SHA-256."""

    data: bytes
    mime: str
    alt: str = "figure"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def name(self) -> str:
        return object_name(self.digest, self.mime)


def _placeholder(digest: str, room: int) -> str:
    head = PLACEHOLDER + digest
    return head + "/" + "-" * max(0, room - len(head) - 1)


def object_name(digest: str, mime: str) -> str:
    return f"{digest}.{'jpg' if mime == JPEG else 'png'}"


def sniff(data: bytes) -> str | None:
    """``image/png`` or ``image/jpeg`` from the first bytes, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PNG
    if data[:3] == b"\xff\xd8\xff":
        return JPEG
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _pillow() -> Any:
    try:
        from PIL import Image as PILImage
    except ImportError:
        return None
    return PILImage


def to_image(obj: Any, alt: str | None = None) -> Image:
    """PNG/JPEG bytes for what the caller gave: bytes, a path, a matplotlib figure, a PIL image.

    Anything with ``_repr_png_`` (IPython's protocol) works too. Raises a
    one-line :class:`MessageError` for anything else.
    """
    if isinstance(obj, Image):
        return obj
    label = alt or "figure"
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
    elif isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        data = _read_image_file(path)
        label = alt or path.name
    elif hasattr(obj, "savefig"):  # a matplotlib Figure
        buf = io.BytesIO()
        try:
            obj.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        except Exception as e:
            raise MessageError(f"cannot render the figure as PNG: {type(e).__name__}: {e}") from None
        data = buf.getvalue()
    elif hasattr(obj, "save") and hasattr(obj, "mode") and hasattr(obj, "size"):  # a PIL image
        buf = io.BytesIO()
        try:
            obj.save(buf, format="PNG")
        except Exception as e:
            raise MessageError(f"cannot save the image as PNG: {type(e).__name__}: {e}") from None
        data = buf.getvalue()
    elif type(obj).__module__.startswith("plotly") and callable(getattr(obj, "to_image", None)):
        try:  # plotly's static export (needs kaleido)
            data = bytes(obj.to_image(format="png"))
        except Exception as e:
            raise MessageError(f"cannot export the plotly figure as PNG ({type(e).__name__}): pip install kaleido") from None
    elif callable(getattr(obj, "_repr_png_", None)):
        try:
            data = obj._repr_png_()
        except Exception as e:
            raise MessageError(f"cannot get PNG bytes from {type(obj).__name__}: {type(e).__name__}") from None
        if isinstance(data, tuple):
            data = data[0]
        if not isinstance(data, (bytes, bytearray)):
            raise MessageError(f"{type(obj).__name__} did not give PNG bytes")
        data = bytes(data)
    else:
        raise MessageError(f"image= takes a matplotlib figure, a PIL image, PNG/JPEG bytes or a path, not {type(obj).__name__}")
    if len(data) > MAX_INPUT_BYTES:
        raise MessageError(f"the image is {len(data) / 1e6:.0f} MB: post one of at most {MAX_INPUT_BYTES // 1_000_000} MB "
                           "(save it smaller, e.g. a lower dpi)")
    mime = sniff(data)
    if mime is None:
        raise MessageError("the image is neither PNG nor JPEG: save it as PNG (fig.savefig(path)) and pass the path")
    out = fit(data, mime)
    return Image(out, sniff(out) or mime, label[:200])


def _read_image_file(path: Path) -> bytes:
    """A path's bytes: only a regular file, at most :data:`MAX_INPUT_BYTES` (checked before reading: no 500 MB read, no /dev/zero)."""
    import stat

    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise MessageError(f"the image {path} is not a file: pass the path of a PNG or JPEG file")
        if st.st_size > MAX_INPUT_BYTES:
            raise MessageError(f"the image {path} is {st.st_size / 1e6:.0f} MB: post one of at most "
                               f"{MAX_INPUT_BYTES // 1_000_000} MB (save it smaller)")
        with open(path, "rb") as f:
            return f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise MessageError(f"cannot read the image {path}: {e.strerror or type(e).__name__}") from None


_fitted: dict[str, bytes] = {}  # the last few images fitted: a cell's figure is checked once


def fit(data: bytes, mime: str) -> bytes:
    """The image within :data:`MAX_SIDE` pixels and :data:`MAX_BYTES` bytes (downscaled with Pillow).

    Without Pillow, an image already that small passes as it is; a bigger one
    is a one-line :class:`MessageError` saying how to fix it.
    """
    key = hashlib.sha256(data).hexdigest()
    hit = _fitted.get(key)
    if hit is not None:
        return hit
    pil = _pillow()
    size = _png_size(data)
    _check_pixels(size)
    if pil is not None:
        size = _checked_size(pil, data)
        _check_pixels(size)
    small = len(data) <= MAX_BYTES and size is not None and max(size) <= MAX_SIDE
    if small or (pil is None and len(data) <= MAX_BYTES and size is None):
        out = data
    elif pil is None:
        raise MessageError(f"the image is larger than {MAX_SIDE} px or {MAX_BYTES // 1_000_000} MB: install Pillow "
                           "(pip install 'chat-magic[plots]') to shrink it, or save it smaller")
    else:
        try:
            out = _shrink(pil, data)
        except MessageError:
            raise
        except Exception as e:  # a damaged image body, out of memory: one line, never a traceback
            raise MessageError(f"the image cannot be read ({type(e).__name__}): save it again as PNG") from None
    if len(_fitted) > 16:
        _fitted.clear()
    _fitted[key] = out
    return out


def _check_pixels(size: tuple[int, int] | None) -> None:
    """Refuse an image too big to decode here (read from its header, before anything is decoded)."""
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise MessageError(f"the image is {size[0]} x {size[1]} pixels: post one of at most {MAX_PIXELS // 1_000_000} "
                           "megapixels (save it smaller, e.g. a lower dpi)")


def _checked_size(pil: Any, data: bytes) -> tuple[int, int]:
    """The image's size from its header, after Pillow's structural check (PNG chunk CRCs): a damaged file is one line."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the pixel cap below says it in one line
            with pil.open(io.BytesIO(data)) as im:
                size = im.size  # reads the header only
                im.verify()
    except pil.DecompressionBombError:
        raise MessageError(f"the image has more than {MAX_PIXELS // 1_000_000} megapixels: save it smaller (e.g. a lower dpi)") from None
    except Exception:
        raise MessageError("the image cannot be read (damaged or cut short): save it again as PNG") from None
    return int(size[0]), int(size[1])


def _shrink(pil: Any, data: bytes) -> bytes:
    with pil.open(io.BytesIO(data)) as im:
        im.load()
        im.thumbnail((MAX_SIDE, MAX_SIDE))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_BYTES:
            return buf.getvalue()
        for quality in (85, 70, 50):
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=quality)
            if buf.tell() <= MAX_BYTES:
                return buf.getvalue()
    raise MessageError(f"the image does not fit in {MAX_BYTES // 1_000_000} MB even as a JPEG: post a smaller one")


def metrics_chart(history: Any, *, title: str = "", limit: int = 4) -> Image | None:
    """A PNG chart of the logged metrics (one panel per metric, its best point marked), or None.

    Rendered headless with matplotlib's Agg canvas (no pyplot, no backend
    switch, nothing shown in the notebook); None without matplotlib or
    with fewer than two points to draw.
    """
    names = [n for n in history.names if len(history.values(n)) >= 2][:limit]
    if not names:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(3.2 * len(names), 2.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        points = history._points[name]
        xs = [s if s is not None else k for k, (s, _) in enumerate(points)]
        ys = [v for _, v in points]
        ax.plot(xs, ys, marker="o" if len(ys) <= 30 else None, markersize=3, linewidth=1.5)
        goal = history.summary(name).goal
        finite = [(y, x) for x, y in zip(xs, ys) if y == y and abs(y) != float("inf")]
        if goal in ("min", "max") and finite:
            best_y, best_x = (min if goal == "min" else max)(finite, key=lambda yx: yx[0])
            ax.plot([best_x], [best_y], marker="*", markersize=10, color="#d93025")
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title[:80], fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image(fit(buf.getvalue(), PNG), PNG, f"metrics of {title}"[:200] if title else "metrics")


# -- store configuration ----------------------------------------------------------


@dataclass(frozen=True)
class StoreSpec:
    """Where images go: kind (``gs``, ``s3``, ``file``), bucket or folder, prefix, public base URL, expiry."""

    kind: str
    bucket: str
    prefix: str = ""
    base_url: str = ""
    expiry: int = MAX_EXPIRY

    @property
    def shown(self) -> str:
        """How messages name the store (no credentials live here)."""
        return f"{self.kind}://{self.bucket}/{self.prefix}".rstrip("/") if self.kind != "file" else f"file://{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "bucket": self.bucket, "prefix": self.prefix, "base_url": self.base_url, "expiry": self.expiry}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StoreSpec:
        return cls(str(d["kind"]), str(d["bucket"]), str(d.get("prefix") or ""), str(d.get("base_url") or ""),
                   int(d.get("expiry") or MAX_EXPIRY))


def _setting(name: str, key: str, to: str | None) -> str:
    """An image setting: the environment first, then ``[spaces.NAME]`` of the config file, then its top level."""
    value = os.environ.get(name, "").strip()
    if value:
        return value
    from . import config

    cfg = config.load_config()
    if to and isinstance(to, str) and "://" not in to:
        table = (cfg.get("spaces") or {}).get(to) or {}
        if isinstance(table, dict) and table.get(key):
            return str(table[key]).strip()
    return str(cfg.get(key) or "").strip()


def parse_expiry(text: str) -> int:
    """Seconds from ``3600``, ``90m``, ``12h`` or ``7d``; at most 7 days."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text or "")
    if not m:
        raise ConfigError(f"{ENV_EXPIRY} is {text!r}: give seconds, or a number with s, m, h or d (e.g. 7d)")
    seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 60 <= seconds <= MAX_EXPIRY:
        raise ConfigError(f"{ENV_EXPIRY} is {text}: a signed URL lives from 1 minute to 7 days (7d)")
    return seconds


def check_base_url(url: str) -> str:
    """A public base URL: ``https``, or plain ``http`` only for loopback (tests, a local server)."""
    from .webhook import is_loopback

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ConfigError(f"{ENV_BASE_URL} is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"{ENV_BASE_URL} must be an https:// URL that serves the store's files")
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigError(f"{ENV_BASE_URL} must be https: Google Chat fetches images over HTTPS only (http only for loopback tests)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"{ENV_BASE_URL} takes a plain URL, without a user, query or fragment")
    return url if url.endswith("/") else url + "/"


def store_spec(to: str | None = None) -> StoreSpec | None:
    """The image store configured for ``to`` (a space name), or None; a mistake is a one-line :class:`ConfigError`."""
    url = _setting(ENV_STORE, "image_store", to)
    if not url or url.lower() in ("off", "none"):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ConfigError(f"{ENV_STORE} is not a valid URL: use gs://bucket/prefix, s3://bucket/prefix or file:///folder") from None
    base = _setting(ENV_BASE_URL, "image_base_url", to)
    base = check_base_url(base) if base else ""
    expiry_text = _setting(ENV_EXPIRY, "image_expiry", to)
    expiry = parse_expiry(expiry_text) if expiry_text else MAX_EXPIRY
    if parts.scheme in ("gs", "s3"):
        if not parts.netloc or parts.username or parts.query:
            raise ConfigError(f"{ENV_STORE} is {parts.scheme}:// with no bucket: use {parts.scheme}://BUCKET/PREFIX")
        module, extra = ("google.cloud.storage", "gcs") if parts.scheme == "gs" else ("boto3", "s3")
        if not _installed(module):
            raise ConfigError(f"{ENV_STORE} is a {parts.scheme}:// store: install its client with pip install 'chat-magic[{extra}]'")
        return StoreSpec(parts.scheme, parts.netloc, parts.path.strip("/"), base, expiry)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"{ENV_STORE} is a file:// URL: give an absolute folder, e.g. file:///srv/www/chat")
        if not base:
            raise ConfigError(f"{ENV_STORE} is a folder: set {ENV_BASE_URL} to the https:// URL your web server serves it at")
        from urllib.parse import unquote

        return StoreSpec("file", unquote(parts.path).rstrip("/") or "/", "", base, expiry)
    raise ConfigError(f"{ENV_STORE} must start with gs://, s3:// or file://, e.g. s3://my-bucket/chat-figures")


def _installed(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- what a message carries ------------------------------------------------------------


@dataclass
class Figures:
    """The images a message carries, the store they go to, and what could not be taken.

    Made in the caller's thread (cheap: bytes from the display data are only
    hashed; a figure object is rendered once). Without a store, the images
    are left out and :meth:`note` says so.
    """

    images: list[Image] = field(default_factory=list)
    spec: StoreSpec | None = None
    problems: list[str] = field(default_factory=list)  # one line per image (or store) that could not be taken
    store_problem: str = ""
    left_out: int = 0  # images beyond max_figures
    taken: list[int] = field(default_factory=list)  # indices (in the items given) of the images that were taken

    @classmethod
    def collect(cls, items: list[Any], *, to: str | None = None, max_figures: int = MAX_FIGURES) -> Figures:
        """Normalise ``items`` (the first ``max_figures``) and find the store; never raises for one bad image."""
        figs = cls()
        for index, obj in enumerate(items[:max(0, max_figures)]):
            try:
                img = obj if isinstance(obj, Image) else to_image(obj)
            except MessageError as e:
                figs.problems.append(str(e))
                continue
            except Exception as e:  # a figure object that breaks in its own code: one line, the notice still goes
                figs.problems.append(f"cannot take the image: {type(e).__name__}")
                continue
            figs.taken.append(index)
            if all(i.digest != img.digest for i in figs.images):
                figs.images.append(img)
        figs.left_out = max(0, len(items) - max(0, max_figures))
        if figs.images:
            try:
                figs.spec = store_spec(to)
            except ConfigError as e:
                figs.store_problem = str(e)
        return figs

    def __bool__(self) -> bool:
        return bool(self.images or self.problems or self.left_out)

    @property
    def postable(self) -> list[Image]:
        return self.images if self.spec is not None else []

    def widgets(self) -> list[dict[str, Any]]:
        """``image`` widgets whose URL is filled in by the worker just before the POST.

        The placeholder is as long as the URL may get (a presigned URL with a
        session token runs to 2 KB), so the message is checked against Chat's
        32,000 bytes with the room its URLs will take.
        """
        room = URL_ROOM if self.spec is not None and not self.spec.base_url else 300
        return [{"image": {"imageUrl": _placeholder(img.digest, room), "altText": img.alt}} for img in self.postable]

    def card(self, card_id: str = "figures") -> dict[str, Any]:
        return {"cardId": card_id, "card": {"sections": [{"widgets": self.widgets()}]}}

    def note(self) -> str:
        """One line on what was left out and how to post it ('' when nothing was)."""
        lines = []
        if self.images and self.spec is None:
            n = len(self.images)
            what = f"{n} figure{'s' if n != 1 else ''} not posted"
            if self.store_problem:
                lines.append(f"{what}: {self.store_problem}")
            else:
                global _hinted
                with _hint_lock:
                    first, _hinted = not _hinted, True
                lines.append(f"{what} — {HINT}" if first else f"{what} (no image store)")
        lines += [f"figure not posted: {p}" for p in self.problems]
        if self.left_out:
            lines.append(f"{self.left_out} more figure{'s' if self.left_out != 1 else ''} not posted (--max-figures)")
        return "\n".join(lines)

    def blobs(self) -> dict[str, tuple[bytes, str]]:
        return {img.digest: (img.data, img.mime) for img in self.postable}

    def column(self, body: str) -> str | None:
        """The outbox's ``images`` value for one message body: the store and the digests it names."""
        digests = list(dict.fromkeys(_PLACEHOLDER.findall(body)))
        if not digests or self.spec is None:
            return None
        mimes = {img.digest: img.mime for img in self.images}
        return json.dumps({"store": self.spec.to_json(), "images": [[d, mimes.get(d, PNG)] for d in digests]})


def attach(text: str | None, cards: list[dict[str, Any]] | None, figures: Figures) -> tuple[str | None, list[dict[str, Any]] | None]:
    """``send``'s text and cards with the figures: an image card, and the note on what was left out."""
    note = figures.note()
    if note:
        text = f"{text}\n{note}" if text else note
    if figures.postable:
        cards = list(cards or []) + [figures.card(f"figures-{figures.images[0].digest[:8]}")]
    return text, cards


# -- stores --------------------------------------------------------------------------


class StoreError(Exception):
    """An upload or signing that failed; ``permanent`` when retrying cannot help (no permission, no bucket)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Store:
    """Put bytes under a name, tell whether a name exists, give the URL Google fetches."""

    def __init__(self, spec: StoreSpec) -> None:
        self.spec = spec

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def put(self, name: str, data: bytes, mime: str) -> None:
        raise NotImplementedError

    def url(self, name: str) -> str:
        raise NotImplementedError

    def public_url(self, name: str) -> str:
        return self.spec.base_url + quote(self.spec.key(name))


class FolderStore(Store):
    """A folder behind the team's web server: files written atomically, served at the base URL."""

    def _path(self, name: str) -> Path:
        return Path(self.spec.bucket) / self.spec.key(name)

    def exists(self, name: str) -> bool:
        try:
            return self._path(name).is_file()
        except OSError as e:  # a name too long, no permission to look: was an exception out of the worker
            import errno

            raise StoreError(f"cannot read the folder {self.spec.bucket}: {e.strerror or type(e).__name__}",
                             permanent=isinstance(e, PermissionError) or e.errno == errno.ENAMETOOLONG) from None

    def put(self, name: str, data: bytes, mime: str) -> None:
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # the web server reads it
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            permanent = isinstance(e, (PermissionError, NotADirectoryError, FileNotFoundError)) or e.errno == 30
            raise StoreError(f"cannot write to the folder {self.spec.bucket}: {e.strerror or type(e).__name__}"
                             + (" (give this user write permission on it)" if isinstance(e, PermissionError) else ""),
                             permanent=permanent) from None

    def url(self, name: str) -> str:
        return self.public_url(name)


class _NoSignatures(logging.Filter):
    """Drops botocore's DEBUG record of each signature: a presigned URL's signature is a 7-day read key for the figure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Signature:", "StringToSign:", "CanonicalRequest:"))


def _hide_signatures() -> None:
    auth = logging.getLogger("botocore.auth")
    if not any(isinstance(f, _NoSignatures) for f in auth.filters):
        auth.addFilter(_NoSignatures())


class S3Store(Store):
    """S3 or an S3-compatible store through boto3 (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ... honoured)."""

    def __init__(self, spec: StoreSpec) -> None:
        super().__init__(spec)
        import boto3
        from botocore.config import Config

        # one try per request, answered within STORE_TIMEOUT: the worker's own retries (and patience) decide the rest,
        # so an upload attempt never outlasts the message's lease (botocore's default: 60 s x 3 tries)
        cfg = Config(signature_version="s3v4", retries={"total_max_attempts": 1, "mode": "standard"},
                     connect_timeout=5, read_timeout=STORE_TIMEOUT)
        _hide_signatures()
        try:
            self.client = boto3.session.Session().client("s3", config=cfg)
        except Exception as e:
            raise StoreError(f"cannot set up the S3 client for {spec.shown}: {type(e).__name__} (check AWS_PROFILE / AWS_REGION)",
                             permanent=True) from None

    def _fail(self, e: BaseException, doing: str) -> StoreError:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = self.spec.shown
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"no AWS credentials to {doing} {where}: set AWS_PROFILE or the AWS_ACCESS_KEY_ID pair", permanent=True)
        if isinstance(e, ClientError):
            err = e.response.get("Error", {}) or {}
            code = str(err.get("Code") or "")
            status = int((e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchBucket",) or (status == 404 and doing != "read"):
                return StoreError(f"the bucket of {where} does not exist ({code or status})", permanent=True)
            if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
                return StoreError(f"the store {where} refused to {doing} ({status} {code}): the credentials need "
                                  "s3:PutObject and s3:GetObject on the bucket", permanent=True)
            return StoreError(f"the store {where} could not {doing} ({status} {code})", permanent=400 <= status < 500 and status not in (408, 429))
        return StoreError(f"the store {where} could not {doing}: {type(e).__name__}", permanent=False)

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.spec.bucket, Key=self.spec.key(name))
            return True
        except ClientError as e:
            status = int((e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            if status == 404 and str((e.response.get("Error") or {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            if status == 403:  # no s3:ListBucket: HEAD of a missing key says 403; the PUT decides
                return False
            raise self._fail(e, "read") from None
        except Exception as e:
            raise self._fail(e, "read") from None

    def put(self, name: str, data: bytes, mime: str) -> None:
        try:
            self.client.put_object(Bucket=self.spec.bucket, Key=self.spec.key(name), Body=data, ContentType=mime,
                                   CacheControl="public, max-age=604800, immutable")
        except Exception as e:
            raise self._fail(e, "upload") from None

    def url(self, name: str) -> str:
        if self.spec.base_url:
            return self.public_url(name)
        try:
            return str(self.client.generate_presigned_url("get_object", Params={"Bucket": self.spec.bucket, "Key": self.spec.key(name)},
                                                          ExpiresIn=self.spec.expiry))
        except Exception as e:
            raise self._fail(e, "sign a URL for") from None


class GCSStore(Store):
    """Google Cloud Storage through google-cloud-storage; V4 URLs signed locally with a service-account key.

    ``STORAGE_EMULATOR_HOST`` (a local emulator) is honoured: uploads go
    there without credentials, and signed URLs point there.
    """

    def __init__(self, spec: StoreSpec) -> None:
        super().__init__(spec)
        from google.cloud import storage

        self.emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
        self.signer: Any = None
        try:
            if self.emulator:
                from google.auth.credentials import AnonymousCredentials

                self.client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "chat-magic", credentials=AnonymousCredentials())
            else:
                self.client = storage.Client(credentials=self._credentials(), project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"cannot set up the Cloud Storage client for {spec.shown}: {type(e).__name__}", permanent=True) from None
        self.bucket = self.client.bucket(spec.bucket)

    def _credentials(self) -> Any:
        if self.signer is None:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError

            try:
                self.signer, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
            except DefaultCredentialsError:
                raise StoreError(f"no Google Cloud credentials for {self.spec.shown}: set GOOGLE_APPLICATION_CREDENTIALS to a "
                                 "service-account key file (or run on a machine with a service account)", permanent=True) from None
        return self.signer

    def _fail(self, e: BaseException, doing: str) -> StoreError:
        where = self.spec.shown
        if isinstance(e, StoreError):
            return e
        code = getattr(e, "code", None)
        code = code if isinstance(code, int) else 0
        if code == 404:
            return StoreError(f"the bucket of {where} does not exist (404)", permanent=True)
        if code in (401, 403):
            return StoreError(f"the store {where} refused to {doing} ({code}): the account needs storage.objects.create "
                              "and storage.objects.get on the bucket", permanent=True)
        if 400 <= code < 500 and code not in (408, 429):
            return StoreError(f"the store {where} could not {doing} ({code})", permanent=True)
        return StoreError(f"the store {where} could not {doing}: {code or type(e).__name__}", permanent=False)

    def exists(self, name: str) -> bool:
        try:
            return bool(self.bucket.blob(self.spec.key(name)).exists(timeout=(5, STORE_TIMEOUT), retry=_gcs_retry()))
        except Exception as e:
            if getattr(e, "code", None) == 403:
                return False  # no storage.objects.get for metadata: the upload decides
            raise self._fail(e, "read") from None

    def put(self, name: str, data: bytes, mime: str) -> None:
        blob = self.bucket.blob(self.spec.key(name))
        blob.cache_control = "public, max-age=604800, immutable"
        try:
            blob.upload_from_string(data, content_type=mime, timeout=(5, STORE_TIMEOUT * 2))
        except Exception as e:
            raise self._fail(e, "upload") from None

    def url(self, name: str) -> str:
        if self.spec.base_url:
            return self.public_url(name)
        from datetime import timedelta

        creds = self._credentials()
        kwargs: dict[str, Any] = {}
        if not hasattr(creds, "sign_bytes") or not getattr(creds, "signer_email", None):
            # default credentials without a key (a VM's service account): sign through IAM signBlob
            try:
                import google.auth.transport.requests

                creds.refresh(google.auth.transport.requests.Request())
                kwargs = {"service_account_email": creds.service_account_email, "access_token": creds.token}
            except Exception:
                raise StoreError(f"cannot sign a URL for {self.spec.shown}: use a service-account key "
                                 "(GOOGLE_APPLICATION_CREDENTIALS) or grant iam.serviceAccounts.signBlob", permanent=True) from None
        endpoint = self.emulator if self.emulator.startswith("http") else (f"http://{self.emulator}" if self.emulator else "https://storage.googleapis.com")
        try:
            return str(self.bucket.blob(self.spec.key(name)).generate_signed_url(
                version="v4", expiration=timedelta(seconds=self.spec.expiry), method="GET",
                credentials=None if kwargs else creds, api_access_endpoint=endpoint, **kwargs))
        except Exception as e:
            raise StoreError(f"cannot sign a URL for {self.spec.shown}: {type(e).__name__}", permanent=True) from None


def _gcs_retry() -> Any:
    """google-cloud-storage's retry, cut to one request's time (its default keeps retrying for 120 s)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    cut = getattr(DEFAULT_RETRY, "with_timeout", None) or DEFAULT_RETRY.with_deadline  # with_deadline: api-core < 2.17
    return cut(STORE_TIMEOUT)


_stores: dict[StoreSpec, Store] = {}
_stores_lock = threading.Lock()


def open_store(spec: StoreSpec) -> Store:
    """The store client for ``spec``, made once per process (clients keep connections and credentials)."""
    store = _stores.get(spec)
    if store is None:
        with _stores_lock:
            store = _stores.get(spec)
            if store is None:
                try:
                    kind = {"file": FolderStore, "s3": S3Store, "gs": GCSStore}[spec.kind]
                except KeyError:
                    raise StoreError(f"unknown image store kind {spec.kind!r}", permanent=True) from None
                try:
                    store = _stores[spec] = kind(spec)
                except ImportError:
                    extra = {"s3": "s3", "gs": "gcs"}.get(spec.kind, "plots")
                    raise StoreError(f"the {spec.kind}:// store's client is not installed here: pip install 'chat-magic[{extra}]'",
                                     permanent=True) from None
    return store


def upload(spec: StoreSpec, images: list[tuple[str, str, bytes | None]]) -> dict[str, str]:
    """Upload each ``(digest, mime, data)`` that the store lacks; return digest -> URL.

    ``data`` None: the bytes are no longer in the outbox (a salvaged row);
    fine if the store has the object already.
    """
    try:
        return _upload(open_store(spec), spec, images)
    except StoreError:
        raise
    except Exception as e:  # a store client's own surprise: retried like a fault, within the patience (never its text)
        raise StoreError(f"the store {spec.shown} failed: {type(e).__name__}", permanent=False) from None


def _upload(store: Store, spec: StoreSpec, images: list[tuple[str, str, bytes | None]]) -> dict[str, str]:
    urls: dict[str, str] = {}
    for digest, mime, data in images:
        name = object_name(digest, mime)
        if not store.exists(name):
            if data is None:
                raise StoreError("the figure's bytes were lost with a damaged outbox", permanent=True)
            started = time.monotonic()
            store.put(name, data, mime)
            log.debug("chat_magic: uploaded %s (%d bytes) to %s in %.2f s", name, len(data), spec.shown, time.monotonic() - started)
        urls[digest] = store.url(name)
    return urls


def fill_payload(payload: str, urls: dict[str, str]) -> str:
    """The body with each placeholder replaced by its URL."""
    body = json.loads(payload)
    _replace(body, lambda digest: urls.get(digest))
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def strip_images(payload: str, line: str) -> str:
    """The body without its pending images, and ``line`` saying why, in the card (or the text)."""
    body = json.loads(payload)
    said = False
    for entry in body.get("cardsV2") or []:
        for section in (entry.get("card") or {}).get("sections") or []:
            widgets = section.get("widgets") or []
            kept = [w for w in widgets if not _pending(w)]
            if len(kept) != len(widgets):
                if not said:
                    kept.append({"textParagraph": {"text": html.escape(line)}})
                    said = True
                section["widgets"] = kept
        sections = (entry.get("card") or {}).get("sections") or []
        if entry.get("card") is not None:
            entry["card"]["sections"] = [s for s in sections if s.get("widgets")]
    body["cardsV2"] = [c for c in body.get("cardsV2") or [] if (c.get("card") or {}).get("sections")]
    if not body["cardsV2"]:
        del body["cardsV2"]
        body["text"] = f"{body['text']}\n{line}" if body.get("text") else line
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _pending(widget: Any) -> bool:
    url = ((widget or {}).get("image") or {}).get("imageUrl") if isinstance(widget, dict) else None
    return isinstance(url, str) and url.startswith(PLACEHOLDER)


def _replace(node: Any, lookup: Any) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "imageUrl" and isinstance(v, str) and v.startswith(PLACEHOLDER):
                url = lookup(v[len(PLACEHOLDER):len(PLACEHOLDER) + 64])
                if url:
                    node[k] = url
            else:
                _replace(v, lookup)
    elif isinstance(node, list):
        for v in node:
            _replace(v, lookup)


_told: set[str] = set()  # permanent store problems said on stderr once per process


def patience() -> float:
    """Seconds a notice waits for a store that does not answer (``CHAT_MAGIC_IMAGE_PATIENCE``: 120, 90s, 5m; default 2 min).

    Read when needed; a bad value (or over 24 h) is one line (once) and the default.
    """
    from .rules import env_seconds

    return env_seconds(ENV_PATIENCE, PATIENCE, least=0.0, most=24 * 3600.0)


def fill(d: Dispatcher, job: Job) -> bool:
    """Upload the job's images and put their URLs in its body, before the POST (the worker's one call here).

    Returns False when the POST must wait: a transient fault was scheduled
    for a retry, like a network fault. A permanent one costs the images: the
    notice goes without them and one line says why. The filled body is
    recorded (and the bytes dropped from the outbox), so every retry sends
    the same body under the same ``requestId``.
    """
    info = json.loads(job.images or "{}")
    try:
        spec = StoreSpec.from_json(info["store"])
        wanted = [(str(dg), str(mime)) for dg, mime in info.get("images") or []]
    except (KeyError, TypeError, ValueError):
        d._record(lambda: d.outbox.set_payload(job, strip_images(job.payload, "figure not posted: its record in the outbox is damaged")))
        return True
    try:
        urls = upload(spec, [(dg, mime, d.outbox.blob(dg)) for dg, mime in wanted])
        payload = fill_payload(job.payload, urls)
        if len(payload.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
            raise StoreError("their URLs do not fit in a 32,000-byte message: use CHAT_MAGIC_IMAGE_BASE_URL (shorter public URLs)",
                             permanent=True)
    except StoreError as e:
        if not e.permanent:
            if job.attempts < PATIENCE_ATTEMPTS and time.time() - job.created_at < patience():
                d._transient(job, 0, "IMAGE_STORE", f"image upload: {e}")
                return False
            # the notice does not wait for its picture any longer: it goes without, and the space's queue goes on
            e = StoreError(f"the image store did not answer ({e})", permanent=True)
        n = len(wanted)
        line = f"{n} figure{'s' if n != 1 else ''} not posted: {e}"
        if str(e) not in _told:
            _told.add(str(e))
            from .console import say

            say(line)
        log.warning("chat_magic: %s", line)
        payload = strip_images(job.payload, line)
    job.payload = payload
    job.images = None
    d._record(lambda: d.outbox.set_payload(job, payload))
    return True
