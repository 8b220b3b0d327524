"""peft integration and version-compat patches."""

PATCHES: tuple = ()
