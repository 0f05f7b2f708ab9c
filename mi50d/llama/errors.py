"""The errors of building llama.cpp; shared by `build` and `hip` (messages are one line)."""

from __future__ import annotations


class BuildError(Exception):
    """A build that cannot start or did not finish; the message is one line for the user."""


class MissingToolError(BuildError):
    """A program the build needs is not on PATH; the message names the package to install."""
