"""Contract suites: one base class per kind of plugin (operators, priors, samplers, guidance, correctors,
training methods), one subclass per registered plugin, as diffusers' ``SchedulerCommonTest``.

A plugin's test class names the plugin (``name``), gives the tiny options its checks run with (``config``) and
inherits every check of its kind; a meta-test in each module fails when a registered plugin has no class, so a new
plugin cannot land without its contract. Shared pieces are in :mod:`contracts.base`.
"""
