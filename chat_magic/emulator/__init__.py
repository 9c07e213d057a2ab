"""A local Google Chat incoming-webhook emulator: real HTTP on a loopback address.

Used by every test and the demo::

    from chat_magic.emulator import Emulator
    with Emulator(qps=None) as emu:
        url = emu.webhook_url("AAAA")
        ...                      # POST to url as to Google Chat
        emu.wait_for(1)          # the stored messages

Run it on its own with ``python -m chat_magic.emulator``.
"""

from .server import FAULTS, Emulator, main, render_page, validate_message

__all__ = ["Emulator", "FAULTS", "main", "render_page", "validate_message"]
