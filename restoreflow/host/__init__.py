"""The plugin host: hook specifications, registries and the pluggy plugin manager that fills them.
Imports only the layers below."""
