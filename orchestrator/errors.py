"""The base of every error a user can cause and fix: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A mistake in the spec, the data, the job or the environment, with a message naming the fix."""
