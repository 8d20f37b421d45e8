"""Closed-form models: Gaussian and Gaussian-mixture priors with exact denoisers and posteriors, the ground
truth the certification suite checks samplers against. Imports only :mod:`restoreflow.core`."""
