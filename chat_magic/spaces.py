"""Set up a webhook without pasting it into a cell or the shell history.

    chat-magic spaces add NAME [--default] [--test]   # asks for the URL with hidden input
    chat-magic spaces list                            # names and spaces, never a key or token
    chat-magic spaces remove NAME
    %chat_setup [NAME] [--default] [--test]           # the same in a notebook, through getpass

The URL is read with hidden input (``getpass``; from a pipe, one line of
stdin), checked, and written under ``[spaces.NAME]`` in the config file with
mode 0600 (:func:`chat_magic.config.save_space`). ``--test`` first posts a
hello and waits for the space's answer; only a delivered hello is saved (a
hello that did not arrive is dropped from the outbox: no later process sends it).
Nothing of the URL is ever printed: a bad URL is named by what is wrong with
it, not by its text.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from . import config
from .console import say
from .errors import ChatMagicError, ConfigError, DeliveryError, DeliveryTimeout, WebhookURLError
from .rules import seconds_arg
from .webhook import Webhook, parse_webhook_url, redact

if TYPE_CHECKING:
    from .delivery import Receipt

__all__ = ["add_space", "list_spaces", "main", "remove_space", "setup_magic"]

PREFIX = "chat-magic spaces"
DEFAULT_NAME = "default"
TEST_TIMEOUT = 30.0
WITHDRAW_WAIT = 20.0  # a failed hello's request still in flight: how long to wait to take it back
HELLO = "👋 chat_magic is set up: messages for *{name}* will arrive in this space."


def _prompt(name: str) -> str:
    return f"Webhook URL for {name} (Apps & integrations > Webhooks; input hidden): "


def read_hidden(prompt: str) -> str:
    """One line with echo off on a terminal; from a pipe, one line of stdin (for scripts)."""
    stdin = sys.stdin
    if stdin is not None and not stdin.isatty():
        return stdin.readline().strip()
    return getpass.getpass(prompt).strip()


def _checked(url: str) -> Webhook:
    """The webhook, or a WebhookURLError whose message shows nothing of what was typed."""
    if not url:
        raise WebhookURLError("nothing was entered: paste the webhook URL at the hidden prompt")
    try:
        return parse_webhook_url(url)
    except WebhookURLError as e:
        reason = str(e)
        for shown in (redact(url.strip()), url.strip()):
            reason = reason.replace(f": {shown}", "").replace(shown, "the URL")
        raise WebhookURLError(f"that is not a Google Chat webhook URL: {reason}") from None


def _say_hello(name: str, webhook: Webhook, timeout: float) -> str:
    """Post the hello and wait for the space's answer; return the message's name.

    A hello that did not arrive is taken back out of the outbox: nothing was
    saved, so no later process may deliver it (or keep listing it as failed).
    """
    from .delivery import send

    receipt = send(HELLO.format(name=name), to=webhook)
    try:
        return receipt.wait(timeout).name or "(no name)"
    except DeliveryTimeout:
        last = receipt.error
        arrived = _withdraw(receipt)
        if arrived:
            return arrived
        why = f" (last error: {redact(last)})" if last else ""
        raise DeliveryError(f"the test message was not delivered within {timeout:g} s{why}, nothing saved") from None
    except DeliveryError as e:
        _withdraw(receipt)
        raise DeliveryError(f"the test message was not delivered, nothing saved: {redact(e)}") from None


def _withdraw(receipt: Receipt, patience: float = WITHDRAW_WAIT) -> str:
    """Drop the hello's parts from the outbox; return its message name if it arrived after all, else ``""``.

    A part whose request is in flight cannot be dropped: wait up to
    ``patience`` seconds for that request to end, then drop it, or say how.
    """
    from .delivery import dispatcher

    box = dispatcher().outbox
    deadline = time.monotonic() + patience
    while True:
        if receipt.status == "sent":  # answered while we gave up: it did arrive
            return receipt.results()[0].name or "(no name)"
        box.drop(receipt.ids)
        if not box.resolve(receipt.ids):
            return ""
        if time.monotonic() > deadline:
            ids = " ".join(str(i) for i in receipt.ids)
            raise DeliveryError(f"the test message was not delivered and is still being sent, nothing saved: "
                                f"chat-magic outbox drop {ids} takes it back")
        time.sleep(0.1)


def add_space(name: str, url: str, *, make_default: bool = False, test: bool = False,
              timeout: float = TEST_TIMEOUT) -> tuple[Webhook, str]:
    """Check ``url``, optionally post a hello, save it as ``name``; return (webhook, hello message name)."""
    config.check_space_name(name)
    webhook = _checked(url)
    hello = _say_hello(name, webhook, timeout) if test else ""
    config.save_space(name, webhook, make_default=make_default)
    return webhook, hello


def remove_space(name: str) -> None:
    config.remove_space(name)


def list_spaces() -> list[str]:
    """One line per destination: name, space, where it comes from. Never a key or token."""
    rows: list[str] = []
    env = config.env_secret(config.ENV_URL)
    if env:
        try:
            rows.append(f"(default)  spaces/{parse_webhook_url(env).space}  from {config.ENV_URL}")
        except ConfigError:
            rows.append(f"(default)  not a webhook URL  from {config.ENV_URL}")
    cfg = config.load_config()
    default = cfg.get("default")
    for name, table in sorted(cfg.get("spaces", {}).items()):
        try:
            where = f"spaces/{parse_webhook_url(table.get('webhook_url', '')).space}"
        except ConfigError:
            where = "no valid webhook_url"
        mark = "  (default)" if name == default and not env else ""
        rows.append(f"{name}  {where}{mark}")
    return [redact(r) for r in rows]


# -- chat-magic spaces -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chat-magic spaces", description="Add, list and remove named Google Chat spaces.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    a = sub.add_parser("add", help="ask for a webhook URL (hidden input) and save it as NAME")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--default", action="store_true", help="make NAME the default space")
    a.add_argument("--test", action="store_true", help="post a hello first and wait for it; save only if it arrived")
    a.add_argument("--timeout", type=seconds_arg(), default=TEST_TIMEOUT, metavar="S", help="--test: how long to wait (default 30)")
    sub.add_parser("list", help="show the named spaces (never a key or token)")
    r = sub.add_parser("remove", help="forget a named space")
    r.add_argument("name", metavar="NAME")
    return p


def main(argv: Sequence[str] | None = None, *, ask: Callable[[str], str] = read_hidden) -> int:
    """``chat-magic spaces ...``: 0 done, 1 the test hello was not delivered, 2 a user's mistake."""
    args = _parser().parse_args(list(argv or []))
    try:
        if args.action == "add":
            config.check_space_name(args.name)
            _, hello = add_space(args.name, ask(_prompt(args.name)), make_default=args.default,
                                 test=args.test, timeout=args.timeout)
            if hello:
                print(f"delivered a hello: {hello}")
            print(f"saved space {args.name!r} in {config.config_path()} (mode 0600)")
            return 0
        if args.action == "remove":
            remove_space(args.name)
            print(f"removed space {args.name!r} from {config.config_path()}")
            return 0
        if args.action == "list":
            rows = list_spaces()
            print(f"{config.config_path()}:" if rows else f"no spaces yet: chat-magic spaces add NAME ({config.config_path()})")
            for row in rows:
                print(f"  {row}")
            return 0
    except ConfigError as e:
        say(e, prefix=PREFIX)
        return 2
    except (ChatMagicError, OSError) as e:
        say(e, prefix=PREFIX)
        return 1
    except (KeyboardInterrupt, EOFError):
        say("cancelled, nothing saved", prefix=PREFIX)
        return 130
    _parser().print_help()
    return 2


# -- %chat_setup -----------------------------------------------------------------------


def setup_magic(line: str = "", *, ask: Callable[[str], str] | None = None) -> None:
    """``%chat_setup [NAME] [--default] [--test]``: ask for the URL through getpass and save it.

    The URL is typed into a password box: it is not in the cell, its output,
    the history or the saved notebook. Without NAME the space is called
    ``default`` and becomes the default. A mistake is one UsageError line.
    """
    import shlex

    from IPython.core.error import UsageError

    usage = "%chat_setup [NAME] [--default] [--test]"

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:  # type: ignore[override]
            raise UsageError(f"%chat_setup: {message}; usage: {usage}")

    parser = Parser(prog="%chat_setup", add_help=False)
    parser.add_argument("name", nargs="?", default=DEFAULT_NAME)
    parser.add_argument("--default", action="store_true")
    parser.add_argument("--test", action="store_true")
    try:
        args = parser.parse_args(shlex.split(line or ""))
        config.check_space_name(args.name)
        url = (ask or getpass.getpass)(_prompt(args.name))  # looked up now: ipykernel swaps getpass.getpass per request
        _, hello = add_space(args.name, url.strip(),
                             make_default=args.default or args.name == DEFAULT_NAME, test=args.test)
    except (ValueError, ChatMagicError, OSError) as e:  # ConfigError is a ValueError; shlex raises one too
        raise UsageError(f"%chat_setup: {redact(e)}") from None
    except (KeyboardInterrupt, EOFError):
        raise UsageError("%chat_setup: cancelled, nothing saved") from None
    print(f"chat_magic: {'the hello arrived; ' if hello else ''}saved space {args.name!r} in {config.config_path()} (mode 0600)")
    _hint_precedence(args.name)


def _hint_precedence(name: str) -> None:
    """Say so when a secret or the environment still wins over what was just saved."""
    config.forget_secrets()
    target = None if name == DEFAULT_NAME else name
    try:
        winner = config.from_secrets(config.secret_name(target))
    except ChatMagicError:
        winner = None
    if winner is not None:
        print(f"chat_magic: note: {config.secret_name(target)} (environment or notebook secret) is set and is used first")
    elif target:
        print(f"chat_magic: use it with --to {name}, e.g. %%chat --to {name}")
