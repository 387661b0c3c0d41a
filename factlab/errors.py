"""The one exception type users see.

Anything a user can get wrong (a malformed fact file, an unknown config key, an impossible
size, a missing path) raises :class:`FactlabError` with a single line that names the file,
row or key at fault. The CLI prints that line and exits non-zero; library users catch it.
"""


class FactlabError(Exception):
    """A user-facing error: one line naming what is wrong."""
