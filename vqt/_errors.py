"""The one base class of errors a user can fix (a bad file, value or missing package)."""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user asked for, not in vqt: the command line prints its message as one
    line (what was wrong, with the value, and what to do) and exits with status 1."""
