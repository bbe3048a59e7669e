"""``fulu-nas bench peers``: the PiMoE layer beside the MoE implementations a user could take
instead (see :mod:`.command`)."""

from .command import add_parser

__all__ = ["add_parser"]
