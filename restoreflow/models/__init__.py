"""Learned models: network architectures (:mod:`.nets`), training data, the training loop and the bundled
weights. Imports only the layers below (core, exact, io)."""
