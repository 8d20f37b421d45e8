"""First-party restoreflow plugins (import name ``restoreflow_plugins``).

Each module is one plugin, registered through the ``restoreflow`` entry-point group in ``pyproject.toml``,
exactly as a third-party package registers its own. A plugin imports only the public ``restoreflow`` API,
never another plugin.
"""
