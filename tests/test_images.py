"""Figures in messages (issue 18): image stores on real local servers, durable upload in the worker.

Stores are real servers on loopback: a folder served by ``http.server``, S3 by
moto in server mode (``AWS_ENDPOINT_URL``), Google Cloud Storage by the
``gcp-storage-emulator`` package with a service-account key generated here (V4
URLs are signed locally with it). Every card is checked by the emulator's
strict mode (the official proto), and each card's ``imageUrl`` is fetched and
must serve the very bytes that were shown.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import socket
import sqlite3
import threading
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import validate_message, wait_until

pytest.importorskip("PIL")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

AWS_SECRET = "aws-secret-" + "s" * 29
AWS_KEY_ID = "AKIACHATMAGICTEST01"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(color: str = "red", size: tuple[int, int] = (120, 80)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def a_figure():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 3, 2, 4])
    return fig


def image_urls(message: dict) -> list[str]:
    return [w["image"]["imageUrl"] for c in message.get("cardsV2") or [] for s in c["card"]["sections"]
            for w in s["widgets"] if "image" in w]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _reset_images():
    from chat_magic import images

    images._stores.clear()
    images._hinted = False
    images._told.clear()


@pytest.fixture(autouse=True)
def fresh_images(monkeypatch):
    for name in ("CHAT_MAGIC_IMAGE_STORE", "CHAT_MAGIC_IMAGE_BASE_URL", "CHAT_MAGIC_IMAGE_EXPIRY"):
        monkeypatch.delenv(name, raising=False)
    _reset_images()
    yield
    _reset_images()


# -- the stores ------------------------------------------------------------------------


class Served:
    """A folder behind a real HTTP server on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def folder_store(tmp_path, monkeypatch):
    served = Served(tmp_path / "www")
    (tmp_path / "www").mkdir()
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_STORE", f"file://{tmp_path / 'www' / 'chat'}")
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_BASE_URL", served.base + "chat/")
    yield served
    served.stop()


class Moto:
    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = _free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def restart(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint)


@pytest.fixture
def s3_store(monkeypatch):
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    moto = Moto()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    moto.client().create_bucket(Bucket="team-figures")
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_STORE", "s3://team-figures/chat/runs")
    yield moto
    moto.server.stop()


def _service_account(path: Path) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": "chat-magic-test", "private_key_id": "k" * 40, "private_key": pem,
            "client_email": "figures@chat-magic-test.iam.gserviceaccount.com", "client_id": "1",
            "token_uri": "http://127.0.0.1:9/token"}  # never used: signing is local, the emulator needs no token
    path.write_text(json.dumps(info))
    return {"info": info, "public": key.public_key()}


@pytest.fixture
def gcs_store(tmp_path, monkeypatch):
    pytest.importorskip("google.cloud.storage")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    sa = _service_account(tmp_path / "sa.json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "sa.json"))
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="team-figures")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_STORE", "gs://team-figures/chat")
    sa["port"] = port
    yield sa
    server.stop()


STORES = ["folder_store", "s3_store", "gcs_store"]


# -- normalising -------------------------------------------------------------------------


def test_to_image_takes_figures_pil_bytes_and_paths(tmp_path):
    from PIL import Image as PILImage

    from chat_magic import images

    raw = png_bytes()
    (tmp_path / "p.png").write_bytes(raw)
    assert images.to_image(raw).data == raw
    assert images.to_image(tmp_path / "p.png").data == raw and images.to_image(str(tmp_path / "p.png")).alt == "p.png"
    assert images.to_image(a_figure()).data[:8] == b"\x89PNG\r\n\x1a\n"
    assert images.to_image(PILImage.new("RGB", (10, 10))).mime == "image/png"
    big = images.to_image(PILImage.new("RGB", (4000, 1000), "blue"))
    with PILImage.open(io.BytesIO(big.data)) as im:
        assert max(im.size) == images.MAX_SIDE
    noisy = PILImage.frombytes("RGB", (1500, 1500), os.urandom(1500 * 1500 * 3))  # 6.7 MB as PNG: only a JPEG fits
    fitted = images.to_image(noisy)
    assert len(fitted.data) <= images.MAX_BYTES and fitted.mime == "image/jpeg"


@pytest.mark.parametrize("bad", [b"GIF89a...", object(), "/no/such/file.png"])
def test_send_bad_image_is_one_line(space, bad):
    import chat_magic
    from chat_magic.errors import MessageError

    with pytest.raises(MessageError) as e:
        chat_magic.send("x", image=bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("store, base, expect", [
    ("ftp://x/y", "", "gs://, s3:// or file://"),
    ("file:///srv/www", "", "CHAT_MAGIC_IMAGE_BASE_URL"),
    ("file:///srv/www", "http://files.example.org/", "https"),
    ("s3://", "", "no bucket"),
])
def test_store_mistakes_are_one_line(monkeypatch, store, base, expect):
    from chat_magic import images
    from chat_magic.errors import ConfigError

    monkeypatch.setenv("CHAT_MAGIC_IMAGE_STORE", store)
    if base:
        monkeypatch.setenv("CHAT_MAGIC_IMAGE_BASE_URL", base)
    with pytest.raises(ConfigError, match=expect.replace("/", ".").replace("+", ".")) as e:
        images.store_spec()
    assert "\n" not in str(e.value)


def test_expiry_default_and_maximum_seven_days(monkeypatch):
    from chat_magic import images
    from chat_magic.errors import ConfigError

    monkeypatch.setenv("CHAT_MAGIC_IMAGE_STORE", "file:///srv/www")
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_BASE_URL", "https://files.example.org/chat")
    assert images.store_spec().expiry == 7 * 86400
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_EXPIRY", "12h")
    assert images.store_spec().expiry == 12 * 3600
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_EXPIRY", "8d")
    with pytest.raises(ConfigError, match="7 days"):
        images.store_spec()


def test_store_per_named_space_from_config(tmp_path, monkeypatch, space):
    from chat_magic import images

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[spaces.ml]\nwebhook_url = "{space.url}"\nimage_store = "s3://ml-bucket/figs"\n'
                   f'[spaces.ops]\nwebhook_url = "{space.url}"\n')
    cfg.chmod(0o600)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    pytest.importorskip("boto3")
    assert images.store_spec("ml") == images.StoreSpec("s3", "ml-bucket", "figs")
    assert images.store_spec("ops") is None


# -- each store: the card's URL serves the very bytes ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_send_figure_bytes_and_path_arrive_as_served_pngs(request, fast_space, tmp_path, store):
    import chat_magic
    from chat_magic import images

    request.getfixturevalue(store)
    raw = png_bytes("green")
    (tmp_path / "plot.png").write_bytes(png_bytes("purple"))
    fig = a_figure()
    shown = images.to_image(fig).data
    receipts = [chat_magic.send("a figure", image=fig), chat_magic.send("bytes", image=raw),
                chat_magic.send("a path", image=tmp_path / "plot.png")]
    for r in receipts:
        r.wait(30)
    msgs = fast_space.wait_for(3)
    expected = [shown, raw, png_bytes("purple")]
    for m, want in zip(msgs, expected):
        validate_message({k: v for k, v in m.items() if k in ("text", "cardsV2")})
        (url,) = image_urls(m)
        assert url.startswith("http://127.0.0.1:")
        got = fetch(url)
        assert got == want and got[:8] == b"\x89PNG\r\n\x1a\n"
        assert hashlib.sha256(got).hexdigest() in urlsplit(url).path  # content-addressed name


@pytest.mark.slow
def test_gcs_url_is_a_v4_signature_by_the_service_account_that_verifies(fast_space, gcs_store, monkeypatch):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    import chat_magic

    monkeypatch.setenv("CHAT_MAGIC_IMAGE_EXPIRY", "2d")
    chat_magic.send("signed", image=png_bytes()).wait(30)
    (url,) = image_urls(fast_space.wait_for(1)[0])
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert q["X-Goog-Expires"] == str(2 * 86400)
    assert q["X-Goog-Credential"].startswith(gcs_store["info"]["client_email"] + "/")
    assert q["X-Goog-SignedHeaders"] == "host"
    # rebuild the V4 string to sign and check the signature with the key's public half
    from urllib.parse import quote

    canonical_query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(q.items()) if k != "X-Goog-Signature")
    canonical = "\n".join(["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"])
    scope = q["X-Goog-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["GOOG4-RSA-SHA256", q["X-Goog-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()])
    gcs_store["public"].verify(bytes.fromhex(q["X-Goog-Signature"]), to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.slow
def test_s3_url_is_presigned_with_the_expiry(fast_space, s3_store, monkeypatch):
    import chat_magic

    monkeypatch.setenv("CHAT_MAGIC_IMAGE_EXPIRY", "3600")
    chat_magic.send("signed", image=png_bytes()).wait(30)
    (url,) = image_urls(fast_space.wait_for(1)[0])
    q = parse_qs(urlsplit(url).query)
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and q["X-Amz-Expires"] == ["3600"]
    assert q["X-Amz-Credential"][0].startswith(AWS_KEY_ID + "/")
    assert urlsplit(url).path.startswith("/team-figures/chat/runs/")
    assert fetch(url) == png_bytes()


# -- durable, exactly once ------------------------------------------------------------------


def _outbox_file(home: Path) -> Path:
    return next(home.rglob("outbox*.sqlite3"))


class HeldSpace:
    """The space's pacing slot held in the outbox: nothing is claimed (nor uploaded) until released."""

    def __init__(self) -> None:
        import time

        from chat_magic import config
        from chat_magic.delivery import dispatcher

        self.key = config.resolve(None).space_key
        self.db = sqlite3.connect(dispatcher().outbox.path, isolation_level=None)
        # 300 s: within what a real hold can be (a slot further ahead counts as a clock step, outbox.MAX_HOLD)
        self.db.execute("INSERT OR REPLACE INTO pacing (space_key, next_slot) VALUES (?, ?)", (self.key, time.time() + 300))

    def release(self) -> None:
        self.db.execute("UPDATE pacing SET next_slot = 0 WHERE space_key = ?", (self.key,))


def test_bytes_are_in_the_outbox_before_send_returns_and_gone_after(fast_space, folder_store):
    import chat_magic

    raw = png_bytes("orange")
    held = HeldSpace()
    r = chat_magic.send("later", image=raw)
    digest = hashlib.sha256(raw).hexdigest()
    assert held.db.execute("SELECT data FROM blob WHERE sha256=?", (digest,)).fetchone()[0] == raw
    assert digest in held.db.execute("SELECT images FROM message WHERE id=?", (r.ids[0],)).fetchone()[0]
    assert not list(folder_store.root.rglob("*.png"))  # not uploaded yet: the worker does that
    held.release()
    r.wait(30)
    (url,) = image_urls(fast_space.wait_for(1)[0])
    assert fetch(url) == raw
    assert held.db.execute("SELECT count(*) FROM blob").fetchone()[0] == 0
    assert held.db.execute("SELECT images FROM message WHERE id=?", (r.ids[0],)).fetchone()[0] is None
    held.db.close()


@pytest.mark.slow
def test_a_retry_sends_the_same_body_and_never_uploads_twice(fast_space, fast_emulator, folder_store, fast_backoff):
    import chat_magic

    raw = png_bytes("teal")
    fast_emulator.inject("lost_reply")  # stored, answer lost: the retry must be the identical request
    fast_emulator.inject("503")
    r = chat_magic.send("retried", image=raw)
    r.wait(30)
    posts = [x for x in fast_space.requests() if x.get("body")]
    assert len(posts) >= 2
    assert len({x["body"] if isinstance(x["body"], str) else json.dumps(x["body"], sort_keys=True) for x in posts}) == 1
    files = list((folder_store.root / "chat").iterdir())
    assert [f.name for f in files] == [hashlib.sha256(raw).hexdigest() + ".png"]
    inode = files[0].stat().st_ino
    chat_magic.send("the same figure again", image=raw).wait(30)  # content-addressed: the object is there, no upload
    assert files[0].stat().st_ino == inode
    urls = [image_urls(m)[0] for m in fast_space.wait_for(2)]
    assert len(set(urls)) == 1


@pytest.mark.slow
def test_store_down_is_retried_like_a_network_fault(fast_space, s3_store, fast_backoff):
    import chat_magic

    s3_store.server.stop()
    r = chat_magic.send("waits for the store", image=png_bytes("navy"))
    wait_until(lambda: (r.error or "").startswith("image upload"), what="a recorded upload fault", timeout=60)
    assert r.status == "pending" and fast_space.messages() == []
    s3_store.restart()
    s3_store.client().create_bucket(Bucket="team-figures")
    r.wait(60)
    (url,) = image_urls(fast_space.wait_for(1)[0])
    assert fetch(url) == png_bytes("navy")


@pytest.mark.slow
def test_permanent_refusal_posts_without_the_image_and_one_line(fast_space, s3_store, monkeypatch, capfd, debug_logs, outbox_home):
    import chat_magic
    from chat_magic import cli

    monkeypatch.setenv("CHAT_MAGIC_IMAGE_STORE", "s3://no-such-bucket/x")
    chat_magic.send("the run finished", image=png_bytes()).wait(30)
    m = fast_space.wait_for(1)[0]
    assert image_urls(m) == []
    shown = json.dumps(m)
    assert "the run finished" in shown and "1 figure not posted" in shown and "does not exist" in shown
    err = capfd.readouterr().err
    assert err.count("figure not posted") == 1
    cli.main(["outbox", "list", "--all"])
    out = capfd.readouterr()
    for text in (shown, err, out.out, out.err, debug_logs.text, _outbox_file(outbox_home).read_bytes().decode("latin-1")):
        assert AWS_SECRET not in text


@pytest.mark.slow
def test_signed_url_and_keys_never_in_logs(fast_space, gcs_store, debug_logs, capfd):
    import chat_magic

    chat_magic.send("x", image=png_bytes()).wait(30)
    (url,) = image_urls(fast_space.wait_for(1)[0])
    signature = parse_qs(urlsplit(url).query)["X-Goog-Signature"][0]
    key_line = gcs_store["info"]["private_key"].splitlines()[1]
    err = capfd.readouterr().err
    for text in (debug_logs.text, err):
        assert signature not in text and key_line not in text


# -- without a store ---------------------------------------------------------------------------


def test_without_a_store_the_text_says_so_once_per_session(fast_space):
    import chat_magic

    chat_magic.send("first", image=png_bytes()).wait(30)
    chat_magic.send("second", image=[png_bytes("red"), png_bytes("blue")]).wait(30)
    first, second = fast_space.wait_for(2)
    assert first["text"] == "first\n1 figure not posted — set CHAT_MAGIC_IMAGE_STORE (see README: Figures)"
    assert second["text"] == "second\n2 figures not posted (no image store)"
    assert "cardsV2" not in first and "cardsV2" not in second


# -- %%chat: the figures and tables a cell shows ------------------------------------------------


def _flush_and_messages(space) -> list[dict]:
    import chat_magic

    assert chat_magic.flush(30), "not everything was delivered"
    return [m for m in space.messages() if m.get("cardsV2")]  # the notices, not the session's announcement


def _widgets(m: dict) -> list[dict]:
    return [w for c in m.get("cardsV2") or [] for s in c["card"]["sections"] for w in s["widgets"]]


def test_chat_cell_posts_displayed_images_in_order(ip, fast_space, folder_store):
    ip.user_ns["pngs"] = [png_bytes(c) for c in ("red", "green", "blue", "black", "white", "gray")]
    ip.run_cell("%%chat --max-figures 3\nfrom IPython.display import Image, display\nfor p in pngs: display(Image(data=p))\nprint('done')",
                store_history=True)
    (m,) = _flush_and_messages(fast_space)
    urls = image_urls(m)
    assert [fetch(u) for u in urls] == ip.user_ns["pngs"][:3]
    text = json.dumps(m)
    assert "3 more figures not posted (--max-figures)" in text and "done" in text


def test_chat_cell_result_image_and_no_figures(ip, fast_space, folder_store):
    ip.user_ns["im"] = __import__("PIL.Image").Image.new("RGB", (30, 20), "red")
    ip.run_cell("%%chat\nim", store_history=True)
    ip.run_cell("%%chat --no-figures\nfrom IPython.display import Image, display\ndisplay(Image(data=im._repr_png_()))", store_history=True)
    first, second = _flush_and_messages(fast_space)
    (url,) = image_urls(first)
    assert fetch(url) == ip.user_ns["im"]._repr_png_()
    assert image_urls(second) == [] and "not posted" not in json.dumps(second)


def test_chat_cell_figure_without_store_is_the_one_line_hint(ip, fast_space):
    ip.user_ns["p"] = png_bytes()
    ip.run_cell("%%chat\nfrom IPython.display import Image, display\ndisplay(Image(data=p))", store_history=True)
    ip.run_cell("%%chat\ndisplay(Image(data=p))", store_history=True)
    first, second = _flush_and_messages(fast_space)
    assert image_urls(first) == []
    texts = [w["textParagraph"]["text"] for w in _widgets(first) if "textParagraph" in w]
    assert "1 figure not posted — set CHAT_MAGIC_IMAGE_STORE (see README: Figures)" in texts
    assert "see README" not in json.dumps(second) and "1 figure not posted (no image store)" in json.dumps(second)


def test_dataframe_result_arrives_as_a_table_with_its_values(ip, fast_space):
    pd = pytest.importorskip("pandas")
    ip.user_ns["pd"] = pd
    ip.run_cell("%%chat\npd.DataFrame({'epoch': [1, 2, 3], 'loss': [0.91, 0.52, 0.33]})", store_history=True)
    ip.run_cell("%%chat\npd.DataFrame({'x': range(10_000), 'y': ['v' * 40] * 10_000})", store_history=True)
    small, big = _flush_and_messages(fast_space)
    (grid,) = [w["grid"] for w in _widgets(small) if "grid" in w]
    cells = [i["title"] for i in grid["items"]]
    assert grid["columnCount"] == 3
    assert cells[:3] == [" ", "epoch", "loss"] and cells[3:6] == ["0", "1", "0.91"] and cells[-3:] == ["2", "3", "0.33"]
    assert "3 rows × 2 columns" in json.dumps(small, ensure_ascii=False)
    pre = [w["textParagraph"]["text"] for w in _widgets(big) if "<pre>" in w.get("textParagraph", {}).get("text", "")]
    assert pre and "v" * 26 + "..." in pre[0] and "\n11  11" in pre[0] and "9999" not in pre[0]
    assert "12 of 10,000 rows" in json.dumps(big)


def test_displayed_dataframe_is_a_monospace_table(ip, fast_space):
    pd = pytest.importorskip("pandas")
    ip.user_ns["pd"] = pd
    ip.run_cell("%%chat\ndisplay(pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']}))", store_history=True)
    (m,) = _flush_and_messages(fast_space)
    sections = [s for c in m["cardsV2"] for s in c["card"]["sections"] if s.get("header") == "Table"]
    assert sections and "a  b" in sections[0]["widgets"][0]["textParagraph"]["text"]


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_matplotlib_in_a_real_kernel_via_chat_cell(request, fast_space, tmp_path, store):
    """A %%chat cell that plots with the inline backend: the card's URL serves the PNG the notebook shows."""
    import base64

    from kernels import execute, make_notebook, outputs

    request.getfixturevalue(store)
    nb_path = make_notebook(
        tmp_path / "plot.ipynb",
        "%load_ext chat_magic",
        "%%chat --title 'loss curve'\nimport matplotlib.pyplot as plt\nplt.plot([3, 2, 1.5, 1.2])\nprint('plotted')",
        "import chat_magic\nassert chat_magic.flush(60)",
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
    env.pop("MPLBACKEND", None)
    nb = execute(nb_path, env=env, log=tmp_path / "kernel.log", timeout=180)
    shown = [base64.b64decode(o["data"]["image/png"]) for o in outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(shown) == 1, (tmp_path / "kernel.log").read_text()[-2000:]
    (m,) = [m for m in fast_space.messages() if m.get("cardsV2")]
    assert "loss curve" in json.dumps(m) and "plotted" in json.dumps(m)
    (url,) = image_urls(m)
    assert fetch(url) == shown[0]


# -- completion cards: image() and a chart of the logged metrics --------------------------------------


def _final_card_message(space) -> dict:
    import chat_magic

    assert chat_magic.flush(60)
    finals = [m for m in space.messages() if any("finished" in c["card"].get("header", {}).get("title", "") for c in m.get("cardsV2") or [])]
    assert finals, [m.get("text") for m in space.messages()]
    return finals[-1]


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_run_completion_card_carries_image_and_metrics_chart(request, fast_space, store):
    from PIL import Image as PILImage

    from chat_magic import notify_when_done

    request.getfixturevalue(store)
    given = png_bytes("maroon")
    with notify_when_done("nightly training") as n:
        for epoch, loss in enumerate([0.9, 0.5, 0.41, 0.38]):
            n.log(loss=loss, acc=0.5 + epoch / 10)
        n.image(given)
    m = _final_card_message(fast_space)
    urls = image_urls(m)
    assert len(urls) == 2
    assert fetch(urls[0]) == given
    chart = fetch(urls[1])
    with PILImage.open(io.BytesIO(chart)) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert "▁" in json.dumps(m, ensure_ascii=False) or "█" in json.dumps(m, ensure_ascii=False)  # the sparklines stay


def test_run_without_store_keeps_sparklines_and_hints_only_for_given_images(fast_space):
    from chat_magic import notify_when_done

    with notify_when_done("no store") as n:
        n.log(loss=0.5)
        n.log(loss=0.4)
    with notify_when_done("no store, an image") as n:
        n.image(png_bytes())
    import chat_magic

    assert chat_magic.flush(30)
    cards = [json.dumps(m, ensure_ascii=False) for m in fast_space.messages() if m.get("cardsV2")]
    assert len(cards) == 2
    assert "not posted" not in cards[0] and "imageUrl" not in cards[0]
    assert "1 figure not posted — set CHAT_MAGIC_IMAGE_STORE (see README: Figures)" in cards[1]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras + numpy 2
def test_keras_chat_callback_card_carries_the_metrics_chart(fast_space, folder_store):
    keras = pytest.importorskip("keras")
    np = pytest.importorskip("numpy")
    from chat_magic.integrations.keras import ChatCallback

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(4), keras.layers.Dense(1)], name="tiny")
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).random((32, 4)).astype("float32")
    model.fit(x, x.sum(axis=1, keepdims=True), epochs=3, batch_size=16, verbose=0, callbacks=[ChatCallback()])
    m = _final_card_message(fast_space)
    (url,) = image_urls(m)
    data = fetch(url)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and hashlib.sha256(data).hexdigest() in url


# -- the emulator: imageUrl checked as Google does, images shown in the web view ---------------------------


@pytest.mark.parametrize("url, ok", [
    ("https://storage.googleapis.com/b/x.png?X-Goog-Signature=ab", True),
    ("http://127.0.0.1:8000/x.png", True),
    ("http://files.example.org/x.png", False),
    ("ftp://files.example.org/x.png", False),
    ("chat-magic-image:" + "0" * 64, False),  # a placeholder that was never filled never gets through
])
def test_emulator_checks_image_urls(fast_emulator, url, ok):
    import requests
    from conftest import KEY, TOKEN

    body = {"cardsV2": [{"cardId": "f", "card": {"sections": [{"widgets": [{"image": {"imageUrl": url, "altText": "a"}}]}]}}]}
    r = requests.post(fast_emulator.webhook_url(space="IMGCHECK", key=KEY, token=TOKEN), json=body, timeout=10)
    assert (r.status_code == 200) is ok, r.text
    if not ok:
        assert r.json()["error"]["status"] == "INVALID_ARGUMENT" and "https://" in r.json()["error"]["message"]


def test_web_view_shows_images_by_url_and_tables_aligned():
    from chat_magic.emulator.webview import render_card

    card = {"cardId": "c", "card": {"sections": [{"widgets": [
        {"image": {"imageUrl": "https://files.example.org/a.png", "altText": "loss \"curve\""}},
        {"grid": {"columnCount": 2, "items": [{"title": "epoch"}, {"title": "loss"}, {"title": "1"}, {"title": "0.5"}]}},
    ]}]}}
    page = render_card(card)
    assert '<img class="w-img" src="https://files.example.org/a.png" alt="loss &quot;curve&quot;"' in page
    assert 'class="w-table" style="grid-template-columns:repeat(2,auto)"' in page


# -- in a real browser: the web view shows the card's figure (the README's screenshot) ----------------------

SCREENSHOT = Path(__file__).resolve().parent.parent / "artifacts" / "figures-webview.png"


@pytest.mark.browser
@pytest.mark.slow
def test_web_view_in_chromium_loads_the_figure(ip, fast_space, folder_store):
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    pd = pytest.importorskip("pandas")
    ip.user_ns["pd"] = pd
    cell = (
        "%%chat --title 'Validation loss'\n"
        "import io\nimport matplotlib.pyplot as plt\nfrom IPython.display import Image, display\n"
        "fig, ax = plt.subplots(figsize=(6, 2.6), dpi=100)\n"
        "ax.plot([0.92, 0.61, 0.47, 0.41, 0.385, 0.379], marker='o', label='val_loss')\n"
        "ax.plot([0.95, 0.55, 0.40, 0.33, 0.29, 0.26], marker='o', label='loss')\n"
        "ax.set_xlabel('epoch'); ax.legend(); ax.grid(alpha=.3); fig.tight_layout()\n"
        "buf = io.BytesIO(); fig.savefig(buf, format='png'); plt.close(fig)\n"
        "display(Image(data=buf.getvalue()))  # in a kernel the inline backend does this\n"
        "print('best val_loss 0.379 at epoch 5')\n"
        "pd.DataFrame({'epoch': [4, 5], 'loss': [0.29, 0.26], 'val_loss': [0.385, 0.379]}).set_index('epoch')"
    )
    ip.run_cell(cell, store_history=True)
    (m,) = _flush_and_messages(fast_space)
    (url,) = image_urls(m)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"{fast_space.emu.base_url}/?space={fast_space.name}")
            img = page.locator("img.w-img")
            sync_api.expect(img).to_have_attribute("src", url)
            page.wait_for_function("() => { const i = document.querySelector('img.w-img'); return i && i.complete && i.naturalWidth > 0 }",
                                   timeout=20000)
            assert page.evaluate("document.querySelector('img.w-img').naturalWidth") == 600
            sync_api.expect(page.locator(".w-table .w-cell").nth(3)).to_have_text("4")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.locator(".card").last.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()


def test_dropping_a_waiting_message_drops_its_image_bytes(fast_space, folder_store):
    import chat_magic
    from chat_magic import cli

    held = HeldSpace()
    kept = chat_magic.send("kept", image=png_bytes("red"))
    dropped = chat_magic.send("dropped", image=png_bytes("blue"))
    assert held.db.execute("SELECT count(*) FROM blob").fetchone()[0] == 2
    cli.main(["outbox", "drop", str(dropped.ids[0])])
    left = {r[0] for r in held.db.execute("SELECT sha256 FROM blob")}
    assert left == {hashlib.sha256(png_bytes("red")).hexdigest()}
    held.release()
    kept.wait(30)
    assert fetch(image_urls(fast_space.wait_for(1)[0])[0]) == png_bytes("red")
    assert held.db.execute("SELECT count(*) FROM blob").fetchone()[0] == 0
    held.db.close()


def test_signed_url_room_is_kept_in_the_message_size(s3_store, fast_space):
    from chat_magic import images

    figs = images.Figures.collect([png_bytes()])
    (w,) = figs.widgets()
    assert len(w["image"]["imageUrl"]) == images.URL_ROOM and w["image"]["imageUrl"].startswith(images.PLACEHOLDER)


def test_notify_image_with_a_bad_object_is_one_line_and_the_notice_still_goes(fast_space, capsys):
    import chat_magic
    from chat_magic import notify_when_done

    with notify_when_done("job") as n:
        n.image(object())
    assert chat_magic.flush(30)
    err = capsys.readouterr().err
    assert "image() not kept: image= takes a matplotlib figure" in err and "Traceback" not in err
    assert any("job finished" in json.dumps(m, ensure_ascii=False) for m in fast_space.messages())
